"""Frozen-feature classifiers: the MAE linear probe and a kNN classifier.

Linear probe (MAE recipe): BatchNorm without affine parameters, then one
linear layer, trained on frozen features. The BatchNorm makes the probe
insensitive to the features' scale, so representations of different
models are compared on equal terms. kNN: cosine similarity, k nearest
training features vote with weights exp(sim / T) (the DINO protocol).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4


def _check(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    for name, t in (("train", train_x), ("test", test_x)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} features contain NaN or Inf: the encoder diverged; check its training loss")


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, cfg: ProbeConfig = ProbeConfig(), seed: int = 0) -> float:
    """Train BatchNorm(affine=False) + Linear on frozen features; return test top-1 accuracy."""
    _check(train_x, train_y, test_x, test_y)
    g = torch.Generator().manual_seed(seed)
    train_x, test_x = train_x.float(), test_x.float()
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    with torch.no_grad():  # seeded init, independent of the global RNG
        head[1].weight.normal_(0, 0.01, generator=g)
        head[1].bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train_x)
    steps_per_epoch = max(1, n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    head.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def knn_correct(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted cosine kNN: whether each test feature's predicted class is right, bool (N_test,)."""
    _check(train_x, train_y, test_x, test_y)
    train_n = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train_n))
    preds = []
    for i in range(0, len(test_x), chunk):
        q = F.normalize(test_x[i:i + chunk].float(), dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) == test_y


KNN_NORMALIZATIONS = ("none", "center", "standardize")


def normalize_for_knn(train_x: torch.Tensor, test_x: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> the same, normalised with training-set statistics before a cosine kNN.

    none: as they are. center: minus the training mean. standardize: also divided by the
    training std per dimension, as the probe's BatchNorm(affine=False) does (same eps).
    """
    if how not in KNN_NORMALIZATIONS:
        raise ValueError(f"kNN normalisation {how!r}: expected one of {', '.join(KNN_NORMALIZATIONS)}")
    if how == "none":
        return train_x, test_x
    train_x, test_x = train_x.float(), test_x.float()
    mean = train_x.mean(0)  # (D,)
    scale = torch.sqrt(train_x.var(0, unbiased=False) + 1e-5) if how == "standardize" else 1.0
    return (train_x - mean) / scale, (test_x - mean) / scale


def accuracy(correct: torch.Tensor) -> float:
    """Fraction of True in a bool (N,) tensor, as an exact fraction rather than a float32 mean."""
    return correct.sum().item() / len(correct)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted cosine kNN top-1 accuracy of test features against train features."""
    return accuracy(knn_correct(train_x, train_y, test_x, test_y, num_classes, k, temperature, chunk))
