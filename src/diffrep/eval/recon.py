"""Reconstruction quality: PSNR and SSIM of images in [-1, 1], per image and as a mean with its interval."""
from __future__ import annotations

import torch

from diffrep.eval.intervals import bootstrap_mean

RESAMPLES = 1000  # bootstrap draws over images for the 95% interval of every mean score here


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of each image pair, on the [0, 1] scale (data range 1)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM of each image pair (torchmetrics; Gaussian window 11 shrunk to fit tiny images), [0, 1] scale."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    size = min(11, x.shape[-1] - (1 - x.shape[-1] % 2))  # odd and no larger than the image
    return structural_similarity_index_measure(((x.float() + 1) / 2), ((y.float() + 1) / 2), data_range=1.0,
                                               kernel_size=size, sigma=1.5 * size / 11, reduction="none")


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-image PSNR in dB."""
    return psnr_per_image(x, y).mean().item()


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-image SSIM."""
    return ssim_per_image(x, y).mean().item()


def mean_with_ci(scores: torch.Tensor, name: str, seed: int = 0) -> dict:
    """{name: mean, name_ci95: [lo, hi]}: a bootstrap percentile interval over the (N,) per-image scores."""
    return {name: scores.double().mean().item(), f"{name}_ci95": list(bootstrap_mean(scores, resamples=RESAMPLES,
                                                                                     seed=seed))}


def scores(pred: torch.Tensor, target: torch.Tensor, prefix: str, seed: int = 0) -> dict:
    """{prefix_psnr, prefix_psnr_ci95, prefix_ssim, prefix_ssim_ci95} of (N, C, H, W) predictions against targets."""
    return (mean_with_ci(psnr_per_image(pred, target), f"{prefix}_psnr", seed)
            | mean_with_ci(ssim_per_image(pred, target), f"{prefix}_ssim", seed))
