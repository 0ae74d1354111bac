"""Control by editing z (SODA's fourth claim): swap one sub-vector between two objects, read what changed.

Layer modulation splits z into one sub-vector per UNet level (nn/unet.py: `z_sizes`). `swap_group` puts
object b's sub-vector g into object a's code. Edit specificity: decode a's code and the edited code from
the same noise at a's pose, read both renders with a factor predictor trained on real renders
(`FactorReader`), and count, per factor, how often the predicted class changes. The share of those
changes on the factor a sub-vector changes most is its specificity (1: it controls one factor only).
Sampling noise alone (the same code decoded from two noises) is reported beside it as the floor, and
each group's specificity is also given over the floor: only the change rate above the floor counts
(`excess = max(0, rate - floor)`), so a factor the reader reads unreliably, whose class flips under a new
noise anyway, does not dilute the share. The edits share their noise with the unedited render, so a
factor the sub-vector does not drive changes below the floor: the over-floor share is conservative.
"""
from __future__ import annotations

import numpy as np
import torch

from diffrep.eval.dci import discretize
from diffrep.eval.features import batched, subset


def group_slices(sizes: tuple[int, ...] | list[int]) -> list[slice]:
    """Sub-vector sizes -> the slice of z each one occupies."""
    ends = np.cumsum([0, *sizes]).tolist()
    return [slice(a, b) for a, b in zip(ends, ends[1:])]


def swap_group(z_a: torch.Tensor, z_b: torch.Tensor, sizes, group: int) -> torch.Tensor:
    """(B, z_dim) codes -> a copy of z_a whose sub-vector `group` is z_b's."""
    slices = group_slices(sizes)
    if not 0 <= group < len(slices):
        raise ValueError(f"edit: group {group} does not exist; this model's z has groups 0..{len(slices) - 1} "
                         f"(sizes {list(sizes)}; 0 = finest UNet level)")
    out = z_a.clone()
    out[:, slices[group]] = z_b[:, slices[group]]
    return out


class FactorReader:
    """Reads the renderer's factors (as DCI's classes) back from images: PCA of pixels -> a forest per factor.

    Images are rows: a tensor or a memory-mapped ImageRows, read `batch_size` at a time. The PCA is fitted on at
    most `fit_rows` training rows (a fixed draw keyed by `seed` when the split has more; all rows, in order,
    otherwise), the forests on every training row's PCA coordinates (N x pca_dim)."""

    def __init__(self, train_x, train_factors: np.ndarray, *, bins: int, pca_dim: int = 64,
                 n_estimators: int = 50, seed: int = 0, fit_rows: int = 10000, batch_size: int = 1000):
        from sklearn.decomposition import PCA
        from sklearn.ensemble import RandomForestClassifier

        self.train_factors, self.bins, self.batch_size = np.asarray(train_factors), bins, batch_size
        if len(self.train_factors) != len(train_x):
            raise ValueError(f"FactorReader: {len(train_x)} training images but {len(self.train_factors)} factor rows")
        y, _ = discretize(self.train_factors, self.train_factors[:1], bins)
        n = len(train_x)
        fit = train_x[:] if n <= fit_rows else train_x[subset(n, fit_rows, "factor-reader", seed).sort().values]
        flat = fit.flatten(1).numpy()  # (min(N, fit_rows), C*H*W)
        self.pca = PCA(n_components=min(pca_dim, *flat.shape), random_state=seed).fit(flat)
        del fit, flat
        feats = self.features(train_x)  # (N, pca_dim)
        self.models = [RandomForestClassifier(n_estimators=n_estimators, min_samples_leaf=2, n_jobs=-1,
                                              random_state=seed).fit(feats, y[:, k]) for k in range(y.shape[1])]

    def features(self, x) -> np.ndarray:
        """(N, C, H, W) rows -> (N, pca_dim) PCA coordinates, in batches."""
        return batched(lambda b: torch.from_numpy(self.pca.transform(b.flatten(1).numpy())), x,
                       batch_size=self.batch_size).numpy()

    def classes(self, factors: np.ndarray) -> np.ndarray:
        """True factor rows -> their classes under the training bins (what `predict` is scored against)."""
        return discretize(self.train_factors, np.asarray(factors), self.bins)[1]

    def predict(self, x) -> np.ndarray:
        """(N, C, H, W) images (a tensor or ImageRows) -> (N, K) predicted factor classes."""
        feats = self.features(x)
        return np.stack([m.predict(feats) for m in self.models], 1)


def specificity(rate: np.ndarray, names: list[str]) -> tuple[str | None, float]:
    """(K,) change rates -> (the top factor, its share of the total); no change at all: (None, 0.0)."""
    total = float(rate.sum())
    if total <= 0:
        return None, 0.0
    top = int(rate.argmax())
    return names[top], float(rate[top] / total)


def edit_specificity(model, sources: torch.Tensor, poses: torch.Tensor, reader: FactorReader, names: list[str], *,
                     seed: int, steps: int | None = None) -> dict:
    """sources (n, C, H, W), one view per object, poses (n, P) to render at; pairs object i with object i+1."""
    dev = next(model.parameters()).device
    z = model.encode(sources.to(dev))
    z_b = z.roll(1, 0)
    g = torch.Generator().manual_seed(seed)
    noise, noise2 = (torch.randn(sources.shape, generator=g).to(dev) for _ in range(2))
    p = poses.to(dev)
    base = reader.predict(model.decode(z, p, noise=noise, steps=steps).cpu())
    floor = (reader.predict(model.decode(z, p, noise=noise2, steps=steps).cpu()) != base).mean(0)
    sizes = model.decoder.z_sizes
    rows = []
    for grp in range(len(sizes)):
        edited = reader.predict(model.decode(swap_group(z, z_b, sizes, grp), p, noise=noise, steps=steps).cpu())
        rate = (edited != base).mean(0)  # (K,)
        top, share = specificity(rate, names)
        top_over, share_over = specificity(np.clip(rate - floor, 0.0, None), names)
        rows.append({"group": grp, "size": int(sizes[grp]), "change_rate": dict(zip(names, rate.round(4).tolist())),
                     "top_factor": top, "specificity": share,
                     "top_factor_over_floor": top_over, "specificity_over_floor": share_over})
    return {"groups": rows, "noise_floor": dict(zip(names, floor.round(4).tolist())), "pairs": int(len(sources))}
