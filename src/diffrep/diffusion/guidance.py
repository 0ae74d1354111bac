"""Classifier-free guidance: pred = (1 + w) pred(c) - w pred(null).

The combination is affine with weights summing to 1, so guiding eps-, v- or
x0-predictions gives the same sampler (every conversion between them is
affine in the prediction for fixed z_t, logsnr): guide whatever the model
predicts, before `to_x0_eps`.

Which conditions are "null" is the model's business, not this module's: a
model trained with independent condition dropout takes per-condition keep
masks. `guided_batched(fn, w)` calls `fn(z2, logsnr2, drop)` once on the
doubled batch, z2 = cat([z, z]), drop = (2B,) bool, False on the first B rows
(conditional) and True on the last B (unconditional); when w == 0 it gets only
the B conditional rows. fn sizes its conditions to z2's batch with
`tile_batch` and decides what `drop` removes; with a SODA-like model
`model(z, logsnr, latent, pose, keep_latent, keep_pose)`, "drop z only" is

    def fn(z2, l2, drop):
        keep = ~drop
        n = z2.shape[0]
        return model(z2, l2, tile_batch(lat, n), tile_batch(pose, n), keep, torch.ones_like(keep))

    x = ddim_sample(guided_batched(fn, w=0.3), shape, schedule)
"""
from __future__ import annotations

from typing import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """(1 + w) * pred_cond - w * pred_uncond; w=0 is the conditional model."""
    return (1.0 + w) * pred_cond - w * pred_uncond


def tile_batch(c: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat a (B, ...) condition along the batch to n rows (n a multiple of B)."""
    if n % c.shape[0]:
        raise ValueError(f"tile_batch: {n} rows is not a multiple of the condition's batch {c.shape[0]}")
    return c.repeat(n // c.shape[0], *([1] * (c.ndim - 1)))


def guided_batched(
    denoise_drop: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], w: float
) -> DenoiseFn:
    """A denoise_fn(z_t, logsnr) applying CFG with one forward pass on a doubled batch.

    denoise_drop(z2, logsnr2, drop) sees 2B rows: rows [:B] with drop=False
    (conditional), rows [B:] with drop=True (unconditional). See the module
    docstring for how a model builds it. w == 0 runs only the conditional half.
    """
    if w < 0:
        raise ValueError(f"guided_batched: guidance weight w must be >= 0, got {w}")

    def fn(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        b = z_t.shape[0]
        if w == 0:
            return denoise_drop(z_t, logsnr, torch.zeros(b, dtype=torch.bool, device=z_t.device))
        drop = torch.arange(2 * b, device=z_t.device) >= b  # (2B,)
        out = denoise_drop(torch.cat([z_t, z_t]), torch.cat([logsnr, logsnr]), drop)
        return cfg_combine(out[:b], out[b:], w)

    return fn
