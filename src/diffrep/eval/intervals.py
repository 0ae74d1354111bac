"""95% intervals for numbers measured on a finite test set.

Accuracies of one deterministic classifier (a kNN, one probe seed) are a count
k of n test images: the Wilson score interval, which stays inside [0, 1] and is
accurate at small n. A number averaged over probe seeds (per-image scores in
{0, 1/S, ..., 1}) or a statistic without a closed form (FD, KID) gets a
percentile bootstrap over test images: resample the images with replacement B
times, recompute, take the 2.5% and 97.5% quantiles. Every resampling is seeded.
"""
from __future__ import annotations

import math

import numpy as np
import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
LEVEL = 0.95


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def resample_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """(B, n) int64: B bootstrap draws of n row indices, with replacement, under a fixed seed."""
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def percentile(values, level: float = LEVEL) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean(scores: torch.Tensor, *, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of per-image scores (N,), resampling images."""
    idx = resample_indices(len(scores), resamples, seed)
    return percentile(scores.double()[idx].mean(1).numpy())


def accuracy_summary(correct: torch.Tensor, *, resamples: int, seed: int) -> dict:
    """{acc, ci95, interval}: Wilson for 0/1 correctness (N,), bootstrap for seed-averaged scores."""
    binary = bool(((correct == 0) | (correct == 1)).all())
    acc = correct.double().mean().item()
    if binary:
        lo, hi = wilson(int(correct.sum()), len(correct))
        how = "wilson"
    else:
        lo, hi = bootstrap_mean(correct, resamples=resamples, seed=seed)
        how = f"bootstrap over test images ({resamples} resamples)"
    return {"acc": acc, "ci95": [lo, hi], "interval": how, "n": len(correct)}
