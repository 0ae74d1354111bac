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

import os

import numpy as np
import torch


class ImageRows:
    """uint8 (N, C, H, W) array -> float32 rows in [-1, 1] on indexing (an int-array index or a slice).

    For a memory-mapped .npy (np.load(..., mmap_mode="r")) the rows are read with os.pread, not through the
    map: the page cache serves them, but no file pages are mapped into the process, so its resident memory
    does not grow with the rows a run has touched (bench/data_scale.py measures it)."""

    def __init__(self, array: np.ndarray):
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"ImageRows: expected a uint8 (N, C, H, W) array, got {array.dtype} {array.shape}")
        self.array = array
        self.shape = tuple(array.shape)
        mapped = isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous
        self._file = (array.filename, array.offset) if mapped else None
        self._row = int(np.prod(self.shape[1:]))  # bytes per image

    def _read(self, idx) -> np.ndarray:
        name, offset = self._file
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.shape[0])
            runs = [(start, max(0, stop - start))] if step == 1 else [(i, 1) for i in range(start, stop, step)]
        else:
            rows = np.asarray(idx, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < -self.shape[0] or rows.max() >= self.shape[0]):
                raise IndexError(f"ImageRows: index out of range for {self.shape[0]} rows")
            runs = [(int(i) % self.shape[0], 1) for i in rows]
        out = np.empty((sum(n for _, n in runs) * self._row,), dtype=np.uint8)
        fd, pos = os.open(name, os.O_RDONLY), 0
        try:
            for i, n in runs:
                size = n * self._row
                got = os.preadv(fd, [memoryview(out)[pos : pos + size]], offset + i * self._row)
                if got != size:
                    raise OSError(f"{name}: short read ({got} of {size} bytes); the file changed or was truncated")
                pos += size
        finally:
            os.close(fd)
        return out.reshape(-1, *self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 4

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        if self._file is not None:
            rows = self._read(idx)  # only these rows, from the file
        else:
            rows = self.array[idx]
            if not rows.flags.writeable:  # a read-only view: copy it (torch wants writable memory)
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
