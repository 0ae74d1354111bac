"""Image grids as PNG (sample sheets, reconstruction strips) written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffrep.io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def tile(images: torch.Tensor, ncol: int, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) row-major into one (rows*(H+pad), ncol*(W+pad), C) uint8 array."""
    x = to_uint8(images)
    if upscale > 1:
        x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = x.shape
    rows = -(-n // ncol)
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):  # N is a few dozen images: a Python loop over tiles is fine here
        r, k = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    return out


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
