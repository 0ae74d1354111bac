"""Running a frozen model over a whole split in batches (features, reconstructions)."""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def batched(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, batch_size: int = 500,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Apply fn to aligned row-chunks of `tensors` (moved to `device`); concatenate results on the CPU."""
    n = len(tensors[0])
    out = [fn(*(t[i:i + batch_size].to(device) for t in tensors)).cpu() for i in range(0, n, batch_size)]
    return torch.cat(out)
