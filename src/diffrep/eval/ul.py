"""Unified Latents' reconstruction evaluation: encode -> z0 -> decoder from pure noise, PSNR/SSIM.

The bitrate (bits per pixel from the prior's ELBO) is the model's own
`bits_per_pixel`; this module measures what those bits buy.
"""
from __future__ import annotations

import torch

from diffrep.eval.features import batched, quantise
from diffrep.eval.recon import scores
from diffrep.train.rng import BatchRNG


def reconstruction(model, x: torch.Tensor, *, generator: torch.Generator, steps: int | None = None, device,
                   batch_size: int = 500) -> tuple[dict, torch.Tensor]:
    """-> ({recon_psnr, recon_ssim, with _ci95}, reconstructions quantised to the data's 256 levels)."""
    rec = quantise(batched(lambda b: model.reconstruct(b, steps=steps, generator=generator), x,
                           batch_size=batch_size, device=device))
    return scores(rec, x, "recon"), rec


@torch.no_grad()
def held_out_terms(model, x: torch.Tensor, seed: int, device, batch_size: int = 250) -> dict:
    """The training loss terms averaged over held-out images (one noise/time draw each, fixed seed)."""
    sums: dict[str, float] = {}
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        loss, terms = model({"images": xb}, BatchRNG(seed, i, len(xb), device=device))
        for k, v in {"loss": loss, **terms}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(xb)
    return {f"test_{k}": v / len(x) for k, v in sums.items()}
