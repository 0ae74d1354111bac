"""Is one classifier really better than another on the same test images? The exact McNemar test.

Two accuracies on one test split of n images differ by sampling noise of about
sqrt(p (1 - p) / n) each (0.75 points at p = 0.94, n = 1,000), but the two
classifiers see the *same* images, so the comparison that matters is paired:
only the images exactly one of them gets right (the discordant pairs) carry
information. Under "equally good" each discordant image is a fair coin; the
two-sided p-value is twice the binomial tail of the smaller count.
"""
from __future__ import annotations

import math

import torch

ALPHA = 0.05


def mcnemar_exact(a_correct: torch.Tensor, b_correct: torch.Tensor) -> dict[str, float | int]:
    """Per-image correctness (N,) of classifiers a and b -> {a_only, b_only, p_value} (two-sided, exact)."""
    if a_correct.shape != b_correct.shape or a_correct.dim() != 1:
        raise ValueError(f"mcnemar_exact: need two (N,) correctness vectors, got {tuple(a_correct.shape)} "
                         f"and {tuple(b_correct.shape)}")
    a, b = a_correct.bool(), b_correct.bool()
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n, low = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2.0**n if n else 1.0  # P(X <= low), X ~ Bin(n, 1/2)
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2.0 * tail)}


def sign_flip_test(a: torch.Tensor, b: torch.Tensor, *, resamples: int, seed: int) -> float:
    """Two-sided p of mean(a - b) = 0 for paired per-image scores, by random sign flips of the differences.

    The permutation test behind McNemar's: under "equally good", swapping the two methods' scores on any
    image is as likely as not. For 0/1 scores it is McNemar's test (use mcnemar_exact: exact there).
    """
    d = (a.double() - b.double())
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (resamples, len(d)), generator=g).double() * 2 - 1  # (B, n)
    t = d.sum().abs()
    hits = int(((signs * d).sum(1).abs() >= t - 1e-12).sum())
    return (1 + hits) / (1 + resamples)


def paired_test(a: torch.Tensor, b: torch.Tensor, *, resamples: int = 10000, seed: int = 0) -> dict:
    """Paired test of two methods' per-image scores (N,) on the same test images.

    0/1 scores (a kNN, one probe seed): the exact McNemar test, with the discordant counts.
    Scores averaged over probe seeds: the sign-flip permutation test (McNemar's, generalised).
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired_test: need two (N,) score vectors, got {tuple(a.shape)} and {tuple(b.shape)}")
    binary = all(bool(((x == 0) | (x == 1)).all()) for x in (a, b))
    out = {"mean_a": a.double().mean().item(), "mean_b": b.double().mean().item()}
    out["diff"] = out["mean_a"] - out["mean_b"]
    if binary:
        out |= mcnemar_exact(a, b) | {"test": "exact McNemar"}
    else:
        out |= {"p_value": sign_flip_test(a, b, resamples=resamples, seed=seed),
                "test": f"paired sign-flip permutation ({resamples} draws)"}
    out["verdict"] = verdict(out["diff"], out["p_value"])
    return out


def verdict(diff: float, p_value: float, alpha: float = ALPHA) -> str:
    """The word a sentence may use: 'beats' / 'loses' only when the paired test says so at p < alpha."""
    if p_value < alpha:
        return "beats" if diff > 0 else "loses"
    return "ties"
