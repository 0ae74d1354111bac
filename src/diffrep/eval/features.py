"""Running a frozen model over a whole split in batches (features, reconstructions), and pixel baselines
(features read from the rows on demand: RowFeatures)."""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def batched(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, batch_size: int = 500,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Apply fn to aligned row-chunks of `tensors` (moved to `device`); concatenate results on the CPU.

    `tensors` may be memory-mapped ImageRows (a chunk is read when needed). Results go into one preallocated
    tensor: a list of many small chunk results pins the freed per-batch buffers in the heap, so peak memory
    grew with the number of rows (measured in bench/data_scale.py)."""
    n, out = len(tensors[0]), None
    for i in range(0, n, batch_size):
        y = fn(*(t[i:i + batch_size].to(device) for t in tensors))
        if out is None:
            out = torch.empty((n, *y.shape[1:]), dtype=y.dtype)
        out[i:i + len(y)] = y
    return out if out is not None else torch.cat([])


class RowFeatures:
    """(N, D) features made from rows on demand: `[idx]` (an index array, a tensor or a slice) -> float32 (B, D) =
    fn(rows[idx]). The pixel baselines' features are the (memory-mapped) images themselves, so the probe and the
    kNN (eval/probe.py) read them batch by batch from the file instead of holding an (N, C*H*W) copy."""

    def __init__(self, rows, fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x.flatten(1)):
        if len(rows.shape) < 2 or len(rows) == 0:
            raise ValueError(f"RowFeatures: rows must be a non-empty (N, ...) tensor or ImageRows, got shape {tuple(rows.shape)}")
        self.rows, self.fn = rows, fn
        self.shape = (len(rows), int(fn(rows[:1]).shape[1]))  # (N, D)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        return self.fn(self.rows[idx]).float()  # (B, D)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RowFeatures":
        """The same rows with fn applied to each batch of features (a per-dimension normalisation, ...)."""
        return RowFeatures(self.rows, lambda x, f=self.fn: fn(f(x)))


BLOCK = 4096  # rows of RowFeatures read at once by the probe's evaluation and the kNN's training side


def blocks(x, size: int | None = None):
    """(start, (b, D) block) over the rows of features: a tensor is one block (the in-memory path, unchanged);
    RowFeatures are read `size` (default BLOCK) rows at a time."""
    if isinstance(x, torch.Tensor):
        yield 0, x
        return
    size = size or BLOCK
    for i in range(0, len(x), size):
        yield i, x[i : i + size]


def pixels(images) -> RowFeatures:
    """The pixel baselines' features: each image flattened, (N, C*H*W), read from the rows when used."""
    return RowFeatures(images)


# model kind -> the method giving its probe features: SODA z, UL clean latent (flattened), l-DAE pooled tokens
FEATURE_METHODS = {"soda": "encode", "ul_stage1": "features", "ldae": "features"}


def feature_fn(net: torch.nn.Module, kind: str, *, device: torch.device | str = "cpu",
               batch_size: int = 500) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images (N, C, H, W) in [-1, 1] -> features (N, D) of a frozen `kind` model, exactly as every probe reads them.

    The one definition used by the linear_probe stage, the online evaluation during training and `diffrep embed`.
    """
    if kind not in FEATURE_METHODS:
        raise ValueError(f"no probe features for a {kind!r} model; expected one of {', '.join(FEATURE_METHODS)}")
    method = getattr(net, FEATURE_METHODS[kind])
    return lambda x: batched(method, x, batch_size=batch_size, device=device).flatten(1)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the nearest of the 256 levels the prepared data can take (no gap from bit depth)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def fit_pca(train, *, dim: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """sklearn PCA with `dim` components fitted on `train` -> a function projecting any (M, D) on them.

    `train`: (N, D) features, or (N, C, H, W) image rows (a tensor or ImageRows); all N rows are read at once,
    so callers pass a bounded subset."""
    from sklearn.decomposition import PCA

    train = train[:].flatten(1)  # (N, D)
    dim = min(dim, train.shape[1], len(train))
    pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(train.numpy())
    return lambda x: torch.from_numpy(pca.transform(x.numpy())).float()


def pca_features(train, *others, dim: int, seed: int, batch_size: int = 500) -> tuple[torch.Tensor, ...]:
    """The top `dim` principal components (fitted on `train`) of train and of each other set.

    Sets of image rows (N, C, H, W; tensors or memory-mapped ImageRows) are flattened and projected
    `batch_size` rows at a time, so only `train` (a bounded subset in every caller) is ever whole in memory."""
    project = fit_pca(train, dim=dim, seed=seed)
    return tuple(batched(lambda b: project(b.flatten(1)), x, batch_size=batch_size) for x in (train, *others))


def spread(n: int, k: int) -> torch.Tensor:
    """k indices evenly spaced over n rows: every class of a class-sorted split is represented."""
    return torch.linspace(0, n - 1, min(k, n)).round().long()


def subset(n_total: int, n: int, *keys) -> torch.Tensor:
    """n of n_total row indices, a fixed random draw keyed by `keys` (train.rng.derive_seed)."""
    from diffrep.train.rng import derive_seed

    return torch.randperm(n_total, generator=torch.Generator().manual_seed(derive_seed(*keys)))[:n]
