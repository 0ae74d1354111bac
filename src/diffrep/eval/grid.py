"""Image grids as PNG (sample sheets, reconstruction strips) written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffrep.io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def tile(images: torch.Tensor, ncol: int, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) in [-1, 1] row-major into one (rows*(H+pad)+pad, ncol*(W+pad)+pad, C) uint8 array.

    Padding and empty slots are white; a short last row keeps the grid `ncol` images wide.
    """
    from torchvision.utils import make_grid  # lazily: importing torchvision takes seconds

    if ncol < 1:
        raise ValueError(f"grid: ncol must be >= 1, got {ncol}")
    x = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    n, c = x.shape[:2]
    rows = -(-n // ncol)
    x = torch.cat([x, x.new_full((rows * ncol - n, *x.shape[1:]), 255)])  # white empty slots
    # make_grid returns a lone image unpadded and turns grey into RGB: pad it here, keep the first c channels
    grid = make_grid(x, nrow=ncol, padding=pad, pad_value=255) if len(x) > 1 else F.pad(x[0], [pad] * 4, value=255)
    return grid[:c].permute(1, 2, 0).contiguous().numpy()


def save_grid(path: str | Path, images: torch.Tensor, ncol: int, upscale: int = 2) -> Path:
    """Write a grid PNG; columns are usually meaningful (e.g. source | reconstruction)."""
    from PIL import Image

    arr = tile(images, ncol, upscale=upscale)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def interleave(*columns: torch.Tensor) -> torch.Tensor:
    """Columns of equal length (N, C, H, W) -> (N * k, C, H, W) ordered row by row."""
    return torch.stack(columns, dim=1).flatten(0, 1)
