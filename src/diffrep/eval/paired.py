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
