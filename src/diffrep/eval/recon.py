"""Reconstruction quality: PSNR and SSIM of images in [-1, 1]."""
from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-image PSNR in dB, on the [0, 1] scale (data range 1)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (torchmetrics; Gaussian window 11 shrunk to fit tiny images) on the [0, 1] scale."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    size = min(11, x.shape[-1] - (1 - x.shape[-1] % 2))  # odd and no larger than the image
    val = structural_similarity_index_measure(((x.float() + 1) / 2), ((y.float() + 1) / 2), data_range=1.0,
                                              kernel_size=size, sigma=1.5 * size / 11)
    return float(val)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of each image pair (the scores `psnr` averages)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM of each image pair, the same window as `ssim`."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    size = min(11, x.shape[-1] - (1 - x.shape[-1] % 2))
    return structural_similarity_index_measure(((x.float() + 1) / 2), ((y.float() + 1) / 2), data_range=1.0,
                                               kernel_size=size, sigma=1.5 * size / 11, reduction="none")
