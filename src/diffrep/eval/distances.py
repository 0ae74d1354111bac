"""Fréchet distance and KID against stored reference statistics, with bootstrap intervals and paired tests.

The reference (EDM/DiT convention): the feature-net features of one named real
set, computed once by the `fid_reference` stage and stored as a versioned
artifact (data/fid_reference/), so any number of generated samples is compared
with the same statistics and the artifact's hash sits in every lineage block.

  FD  = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2)    (torch-fidelity's formula, from the statistics)
  KID = unbiased MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3 (torchmetrics' kernel), any two set sizes

Intervals: percentile bootstrap, resampling the reference images and the
generated images together (B draws, seeded). Resampling with replacement
duplicates images, which shrinks a set's spread and inflates its FD, so the FD
draws are shifted by their bias (their mean minus the FD of the real sets)
before the quantiles are read (bias-corrected percentile interval; an FD is never
below 0, so shifted draws are clipped there). For KID a
resampled image is never paired with a copy of itself, so the estimator stays
unbiased and needs no shift.
A paired bootstrap of two sets against the same reference resamples the
reference once per draw for both, so their difference carries the shared noise once.
"""
from __future__ import annotations

import numpy as np
import torch

from diffrep.eval.intervals import percentile


def _check(*sets: torch.Tensor) -> None:
    d = sets[0].shape[1] if sets[0].dim() == 2 else None
    for s in sets:
        if s.dim() != 2 or s.shape[1] != d or len(s) < 2:
            raise ValueError(f"feature sets must be (N >= 2, D) with the same D, got {[tuple(x.shape) for x in sets]}")
        if not torch.isfinite(s).all():
            raise ValueError("features contain NaN or Inf (a diverged model produced the images)")


def stats(features: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """{mu (D,), sigma (D, D)} in float64; weights = bootstrap multiplicities (a resample without copying)."""
    f = features.double()
    w = torch.ones(len(f), dtype=torch.float64) if weights is None else weights.double()
    mu = (w[:, None] * f).sum(0) / w.sum()
    c = f - mu
    sigma = (c.T * w) @ c / (w.sum() - 1)
    return {"mu": mu.numpy(), "sigma": sigma.numpy()}


def frechet(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """FD of two {mu, sigma} by torch-fidelity's formula (the trace of the matrix root through eigenvalues)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return max(0.0, fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def _kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchmetrics.image.kid import poly_kernel

    return poly_kernel(a.double(), b.double())  # (x.y / D + 1)^3


class KidKernels:
    """The three kernel matrices of a (reference, generated) pair, computed once for every bootstrap draw."""

    def __init__(self, ref: torch.Tensor, gen: torch.Tensor):
        self.rr, self.gg, self.rg = _kernel(ref, ref), _kernel(gen, gen), _kernel(ref, gen)

    def kid(self, w: torch.Tensor | None = None, v: torch.Tensor | None = None) -> float:
        """Unbiased MMD^2; w, v: multiplicities of the reference and generated rows (None: each once)."""
        w = torch.ones(len(self.rr), dtype=torch.float64) if w is None else w.double()
        v = torch.ones(len(self.gg), dtype=torch.float64) if v is None else v.double()

        def within(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # mean over pairs of distinct images
            return (m @ k @ m - (m * m * k.diagonal()).sum()) / (m.sum() ** 2 - (m * m).sum())

        return float(within(self.rr, w) + within(self.gg, v) - 2 * (w @ self.rg @ v) / (w.sum() * v.sum()))


def _counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(idx, minlength=n)


def distances(ref: torch.Tensor, sets: dict[str, list[torch.Tensor]], *, resamples: int, seed: int,
              pairs: list[tuple[str, str]] = ()) -> dict:
    """FD and KID of each named set against the reference, with 95% intervals and paired differences.

    sets: name -> one feature tensor per independent draw (e.g. per sample seed); a set's FD/KID is the mean
    over its draws. pairs: (a, b) names whose difference (a - b) gets a paired-bootstrap interval and p-value.
    """
    _check(ref, *(f for fs in sets.values() for f in fs))
    ref_stats = stats(ref)
    kernels = {name: [KidKernels(ref, f) for f in fs] for name, fs in sets.items()}
    out: dict = {}
    for name, fs in sets.items():
        fd = [frechet(stats(f), ref_stats) for f in fs]
        kid = [k.kid() for k in kernels[name]]
        out[name] = {"fd": float(np.mean(fd)), "kid": float(np.mean(kid)), "fd_draws": fd, "kid_draws": kid,
                     "n": [len(f) for f in fs]}
    g = torch.Generator().manual_seed(seed)
    draws: dict[str, dict[str, list[float]]] = {name: {"fd": [], "kid": []} for name in sets}
    for _ in range(resamples):
        r_idx = torch.randint(0, len(ref), (len(ref),), generator=g)
        w, r_stats = _counts(r_idx, len(ref)), stats(ref[r_idx])
        for name, fs in sets.items():
            fd, kid = [], []
            for f, k in zip(fs, kernels[name]):
                idx = torch.randint(0, len(f), (len(f),), generator=g)
                fd.append(frechet(stats(f[idx]), r_stats))
                kid.append(k.kid(w, _counts(idx, len(f))))
            draws[name]["fd"].append(float(np.mean(fd)))
            draws[name]["kid"].append(float(np.mean(kid)))
    for name in sets:
        fd = np.asarray(draws[name]["fd"])
        draws[name]["fd"] = np.maximum(fd - (fd.mean() - out[name]["fd"]), 0.0)  # remove the resampling bias; FD >= 0
        for key in ("fd", "kid"):
            out[name][f"{key}_ci95"] = list(percentile(draws[name][key]))
    out["paired"] = []
    for a, b in pairs:
        for key in ("fd", "kid"):
            da, db = np.asarray(draws[a][key]), np.asarray(draws[b][key])
            d = da - db
            p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()) + 1 / resamples)
            row = {"a": a, "b": b, "metric": key, "diff": out[a][key] - out[b][key], "diff_ci95": list(percentile(d)),
                   "p_value": float(p), "test": f"paired bootstrap ({resamples} draws, shared reference resample)"}
            if key == "fd":  # how many times the floor: the same draws give the ratio its interval
                row |= {"ratio": out[a]["fd"] / max(out[b]["fd"], 1e-12),
                        "ratio_ci95": list(percentile(da / np.maximum(db, 1e-12)))}
            out["paired"].append(row)
    return out

