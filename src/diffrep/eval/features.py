"""Running a frozen model over a whole split in batches (features, reconstructions), and pixel baselines."""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def batched(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, batch_size: int = 500,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Apply fn to aligned row-chunks of `tensors` (moved to `device`); concatenate results on the CPU."""
    n = len(tensors[0])
    out = [fn(*(t[i:i + batch_size].to(device) for t in tensors)).cpu() for i in range(0, n, batch_size)]
    return torch.cat(out)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the nearest of the 256 levels the prepared data can take (no gap from bit depth)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def fit_pca(train: torch.Tensor, *, dim: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """sklearn PCA with `dim` components fitted on `train` (N, D) -> a function projecting any (M, D) on them."""
    from sklearn.decomposition import PCA

    dim = min(dim, train.shape[1], len(train))
    pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(train.numpy())
    return lambda x: torch.from_numpy(pca.transform(x.numpy())).float()


def pca_features(train: torch.Tensor, *others: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The top `dim` principal components (fitted on `train`) of train and of each other set."""
    project = fit_pca(train, dim=dim, seed=seed)
    return tuple(project(x) for x in (train, *others))


def spread(n: int, k: int) -> torch.Tensor:
    """k indices evenly spaced over n rows: every class of a class-sorted split is represented."""
    return torch.linspace(0, n - 1, min(k, n)).round().long()


def subset(n_total: int, n: int, *keys) -> torch.Tensor:
    """n of n_total row indices, a fixed random draw keyed by `keys` (train.rng.derive_seed)."""
    from diffrep.train.rng import derive_seed

    return torch.randperm(n_total, generator=torch.Generator().manual_seed(derive_seed(*keys)))[:n]
