"""Frozen-feature classifiers and the one protocol every stage probes with.

Linear probe (MAE recipe): BatchNorm without affine parameters, then one
linear layer, trained on frozen features. The BatchNorm makes the probe
insensitive to the features' scale, so representations of different
models are compared on equal terms. kNN: cosine similarity, k nearest
training features vote with weights exp(sim / T) (the DINO protocol).

The protocol (`choose`, then `report`), with every setting from the `probe`
section of params.yaml and nothing else:
  1. choose on val: the kNN k from `probe.knn_k` and the probe learning rate
     from `probe.lr` that score best on the validation split (the first probe
     seed; ties go to the earlier candidate);
  2. report on test, once: kNN with that k (Wilson 95% interval) and the probe
     with that lr trained once per seed in `probe.seeds`, its per-image
     correctness averaged over seeds (bootstrap 95% interval over test images).
Both keep the per-image scores, so any two representations can be compared by
a paired test on the same test images (eval/paired.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffrep.config import LinearProbeConfig
from diffrep.eval.features import blocks
from diffrep.eval.intervals import accuracy_summary
from diffrep.train.rng import derive_seed

# (features of the training split (N, D), of the evaluated split (M, D)): tensors, or RowFeatures read in batches
Pair = tuple[torch.Tensor, torch.Tensor]


def _check(train_x, train_y: torch.Tensor, test_x, test_y: torch.Tensor) -> None:
    if len(train_x.shape) != 2 or len(test_x.shape) != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    for name, t in (("train", train_x), ("evaluated", test_x)):
        if not all(torch.isfinite(b).all() for _, b in blocks(t)):
            raise ValueError(f"{name} features contain NaN or Inf: the encoder diverged; check its training loss")


def _float(x):
    return x.float() if isinstance(x, torch.Tensor) else x  # RowFeatures give float32 batches


def linear_probe_correct(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                         num_classes: int, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                         seed: int) -> torch.Tensor:
    """Train BatchNorm(affine=False) + Linear on frozen features; whether each test image is right, bool (M,)."""
    _check(train_x, train_y, test_x, test_y)
    g = torch.Generator().manual_seed(seed)
    train_x, test_x = _float(train_x), _float(test_x)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    with torch.no_grad():  # seeded init, independent of the global RNG
        head[1].weight.normal_(0, 0.01, generator=g)
        head[1].bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train_x)
    steps_per_epoch = max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return torch.cat([head(b).argmax(1) for _, b in blocks(test_x)]) == test_y


def knn_correct(train_x, train_y: torch.Tensor, test_x, test_y: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted cosine kNN: whether each test feature's predicted class is right, bool (N_test,).

    Features are tensors, or RowFeatures: then the training rows are read in blocks and the k nearest kept as
    a running top-k, so no (N, D) copy is made (the same neighbours, up to the order of exact ties)."""
    _check(train_x, train_y, test_x, test_y)
    train_n = F.normalize(train_x.float(), dim=1) if isinstance(train_x, torch.Tensor) else None
    k = min(k, len(train_x))
    preds = []
    for i in range(0, len(test_x), chunk):
        q = F.normalize(test_x[i:i + chunk].float(), dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1) if train_n is not None else _streamed_topk(q, train_x, k)  # (b, k)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) == test_y


def _streamed_topk(q: torch.Tensor, train, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, D) unit queries -> the cosine similarities and row indices (b, k) of their k nearest training rows."""
    best_s = best_i = None
    for start, block in blocks(train):
        s = q @ F.normalize(block, dim=1).T  # (b, n_block)
        i = torch.arange(start, start + s.shape[1]).expand_as(s)
        if best_s is not None:
            s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
        best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
        best_i = i.gather(1, pos)
    return best_s, best_i


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
    if not isinstance(train_x, torch.Tensor):  # RowFeatures: float64 moments over blocks, applied per batch
        n, s1, s2 = len(train_x), 0.0, 0.0
        for _, b in blocks(train_x):
            s1, s2 = s1 + b.double().sum(0), s2 + b.double().square().sum(0)
        mean = s1 / n
        scale = torch.sqrt((s2 / n - mean.square()).clamp_min(0) + 1e-5).float() if how == "standardize" else 1.0
        norm = lambda b, m=mean.float(): (b - m) / scale
        return tuple(x.map(norm) if not isinstance(x, torch.Tensor) else norm(x.float()) for x in (train_x, test_x))
    train_x, test_x = train_x.float(), test_x.float()
    mean = train_x.mean(0)  # (D,)
    scale = torch.sqrt(train_x.var(0, unbiased=False) + 1e-5) if how == "standardize" else 1.0
    return (train_x - mean) / scale, (test_x - mean) / scale


def accuracy(correct: torch.Tensor) -> float:
    """Fraction of True in a bool (N,) tensor, as an exact fraction rather than a float32 mean."""
    return correct.sum().item() / len(correct)


# ---------------------------------------------------------------- the protocol
def probe_seed(p: LinearProbeConfig, run_seed: int, i: int) -> int:
    """The i-th probe seed of a run (head init and data order), the same in every stage."""
    return derive_seed("probe", run_seed, p.seeds[i])


class Probe:
    """The `probe` params bound to one split's labels: every stage probes through this."""

    def __init__(self, p: LinearProbeConfig, train_y: torch.Tensor, num_classes: int, run_seed: int):
        self.p, self.train_y, self.k, self.run_seed = p, train_y, num_classes, run_seed

    def knn(self, pair: Pair, y: torch.Tensor, k: int) -> torch.Tensor:
        return knn_correct(pair[0], self.train_y, pair[1], y, self.k, k=k, temperature=self.p.knn_temperature)

    def linear(self, pair: Pair, y: torch.Tensor, lr: float, i: int = 0) -> torch.Tensor:
        p = self.p
        return linear_probe_correct(pair[0], self.train_y, pair[1], y, self.k, epochs=p.epochs,
                                    batch_size=p.batch_size, lr=lr, weight_decay=p.weight_decay,
                                    seed=probe_seed(p, self.run_seed, i))

    def choose(self, val_pair: Pair, val_y: torch.Tensor, *, linear: bool = True) -> dict:
        """Step 1, on val only: the kNN k and (if linear) the probe lr, with their val accuracies."""
        knn = {k: accuracy(self.knn(val_pair, val_y, k)) for k in self.p.knn_k}
        best_k = max(knn, key=lambda k: (knn[k], -self.p.knn_k.index(k)))
        out = {"knn_k": best_k, "val_knn": knn[best_k], "val_knn_by_k": knn}
        if linear:
            lin = {lr: accuracy(self.linear(val_pair, val_y, lr)) for lr in self.p.lr}
            best_lr = max(lin, key=lambda lr: (lin[lr], -self.p.lr.index(lr)))
            out |= {"lr": best_lr, "val_linear": lin[best_lr], "val_linear_by_lr": lin}
        return out

    def report(self, test_pairs: list[Pair], test_y: torch.Tensor, choice: dict) -> tuple[dict, dict]:
        """Step 2, on test: -> (summary, per-image scores {'knn', 'linear'}).

        test_pairs: one (train, test) feature pair per probe seed, or one pair for fixed features.
        The kNN uses the first pair (for a fixed representation every pair is the same).
        """
        n_seeds = len(self.p.seeds)
        pairs = test_pairs * n_seeds if len(test_pairs) == 1 else test_pairs
        if len(pairs) != n_seeds:
            raise ValueError(f"probe.report: {len(test_pairs)} feature pairs for {n_seeds} probe seeds")
        b, seed = self.p.bootstrap, self.run_seed
        knn = self.knn(pairs[0], test_y, choice["knn_k"])
        summary = {"dim": int(pairs[0][0].shape[1]),
                   "knn": accuracy_summary(knn, resamples=b, seed=seed) | {"k": choice["knn_k"]}}
        scores = {"knn": knn}
        if "lr" in choice:
            runs = torch.stack([self.linear(pr, test_y, choice["lr"], i) for i, pr in enumerate(pairs)])  # (S, M)
            scores["linear"] = runs.double().mean(0)  # (M,) in {0, 1/S, ..., 1}
            summary["linear"] = accuracy_summary(scores["linear"], resamples=b, seed=seed) | {
                "lr": choice["lr"], "seed_runs": [accuracy(r) for r in runs],
                "seed_std": runs.double().mean(1).std().item() if n_seeds > 1 else 0.0}
        summary["chosen_on_val"] = {k: v for k, v in choice.items()}
        return summary, scores




def comparisons(probe: Probe, scores: dict[str, dict], pairs: list[tuple[str, str]], classifier: str) -> list[dict]:
    """One row per (a, b): the paired test of a against b on the same test images, with its verdict."""
    from diffrep.eval.paired import paired_test

    return [{"a": a, "b": b, "classifier": classifier,
             **paired_test(scores[a][classifier], scores[b][classifier], resamples=probe.p.bootstrap,
                           seed=probe.run_seed)} for a, b in pairs]
