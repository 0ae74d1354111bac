"""What the Trainer accepts as training data, and how one step gathers its rows.

`data` is a dict of N-first columns; each may be
  - a torch.Tensor (in memory, indexed directly),
  - a numpy array, memory-mapped or not (np.load(..., mmap_mode="r")): only the
    step's rows are read, then turned into a tensor,
  - an `ImageRows` view of a uint8 (N, C, H, W) array, memory-mapped in practice:
    rows come back as float32 in [-1, 1], exactly what Prepared.images_float gives,
  - an `ObjectViews` view: single-view rows regrouped by object through an index
    (n_obj, V); a row is an object, read as its V views (B, V, C, H, W).
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
            rows = rows % self.shape[0]
            cut = np.flatnonzero(np.diff(rows) != 1) + 1  # consecutive rows (an object's views) are one read
            runs = [(int(r[0]), len(r)) for r in np.split(rows, cut)] if rows.size else []
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


def view_index(object_ids: torch.Tensor) -> torch.Tensor:
    """(N,) object id per view row -> (n_obj, V) row indices: objects in id order, each object's views in row order
    (a stable argsort). For sources with several camera views per object (shapes); every object must have the
    same number V >= 2."""
    order = torch.argsort(object_ids, stable=True)
    ids, counts = torch.unique_consecutive(object_ids[order], return_counts=True)
    if counts.min() != counts.max():
        raise ValueError(f"shapes data: objects have between {counts.min()} and {counts.max()} views; "
                         "SODA's 3D views need the same number of views per object (re-run prepare)")
    V = int(counts[0])
    if V < 2:
        raise ValueError("shapes data: every object needs at least 2 views for novel-view training")
    return order.unflatten(0, (len(ids), V))


class ObjectViews:
    """Rows of single views (an ImageRows, or a tensor) seen one object per row: `[idx]` -> float32 (B, V, C, H, W).

    `index` (n_obj, V) holds each object's view rows (`view_index`); indexing (an int array, a tensor or a slice of
    objects) reads only those objects' views, so the Trainer's batches and the evaluation's chunks touch B * V rows."""

    def __init__(self, rows: ImageRows | torch.Tensor, index: torch.Tensor):
        if not (isinstance(rows, ImageRows) or isinstance(rows, torch.Tensor) and rows.ndim == 4):
            raise TypeError("ObjectViews: rows must be an ImageRows (Prepared.image_rows) or a (N, C, H, W) tensor, "
                            f"got {type(rows).__name__} {tuple(getattr(rows, 'shape', ()))}")
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.ndim != 2:
            raise ValueError("ObjectViews: index must be an int64 (n_objects, views) tensor (view_index(object_ids)); "
                             f"got {getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
        if index.numel() and (index.min() < 0 or index.max() >= len(rows)):
            raise IndexError(f"ObjectViews: index holds rows outside 0..{len(rows) - 1} (the ImageRows has {len(rows)})")
        self.rows, self.index = rows, index
        self.shape = (*index.shape, *rows.shape[1:])  # (n_obj, V, C, H, W)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 5

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        sel = self.index[idx]  # (B, V)
        return self.rows[sel.reshape(-1)].unflatten(0, tuple(sel.shape))  # (B, V, C, H, W)


def n_rows(v) -> int:
    return int(v.shape[0]) if len(v.shape) else 0


def check_data(data: dict, batch_size: int) -> int:
    """The number of items; refuses an empty dict, unknown column types, disagreeing lengths, too few items."""
    if not data or not all(isinstance(v, (torch.Tensor, np.ndarray, ImageRows, ObjectViews)) for v in data.values()):
        raise ValueError("Trainer: `data` must be a non-empty dict of N-first tensors, numpy arrays (memory-mapped "
                         "or not), ImageRows or ObjectViews")
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
    if isinstance(v, (ImageRows, ObjectViews)):
        return v[idx]
    rows = v[idx.numpy()]  # fancy indexing: a fresh, writable copy of just these rows
    return torch.from_numpy(np.ascontiguousarray(rows))
