"""What the Trainer accepts as training data, and how one step gathers its rows.

`data` is a dict of N-first columns; each may be
  - a torch.Tensor (in memory, indexed directly),
  - a numpy array, memory-mapped or not (np.load(..., mmap_mode="r")): only the
    step's rows are read, then turned into a tensor,
  - an `ImageRows` view of a uint8 (N, C, H, W) array, memory-mapped in practice:
    rows come back as float32 in [-1, 1], exactly what Prepared.images_float gives.
So a split on disk is never read whole: a step touches batch_size rows of it.
"""
from __future__ import annotations

import numpy as np
import torch


class ImageRows:
    """uint8 (N, C, H, W) array -> float32 rows in [-1, 1] on indexing (an int-array index or a slice)."""

    def __init__(self, array: np.ndarray):
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"ImageRows: expected a uint8 (N, C, H, W) array, got {array.dtype} {array.shape}")
        self.array = array
        self.shape = tuple(array.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 4

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        rows = self.array[idx]  # reads only these rows from a memory map
        if not rows.flags.writeable:  # a slice of a read-only map is a view: copy it (torch wants writable memory)
            rows = np.array(rows)
        return torch.from_numpy(rows).float().mul_(2.0 / 255.0).sub_(1.0)  # (B, C, H, W), as images_float


def n_rows(v) -> int:
    return int(v.shape[0]) if len(v.shape) else 0


def check_data(data: dict, batch_size: int) -> int:
    """The number of items; refuses an empty dict, unknown column types, disagreeing lengths, too few items."""
    if not data or not all(isinstance(v, (torch.Tensor, np.ndarray, ImageRows)) for v in data.values()):
        raise ValueError("Trainer: `data` must be a non-empty dict of N-first tensors, numpy arrays (memory-mapped "
                         "or not) or ImageRows")
    sizes = {k: n_rows(v) for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Trainer: data tensors disagree on the number of items: {sizes}")
    n = next(iter(sizes.values()))
    if n < batch_size:
        raise ValueError(f"Trainer: {n} training items but train.batch_size={batch_size}; lower the batch size")
    return n


def gather(v, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (B,) of one column as a CPU or in-place tensor (B, ...)."""
    if isinstance(v, torch.Tensor):
        return v[idx]
    if isinstance(v, ImageRows):
        return v[idx]
    rows = v[idx.numpy()]  # fancy indexing: a fresh, writable copy of just these rows
    return torch.from_numpy(np.ascontiguousarray(rows))
