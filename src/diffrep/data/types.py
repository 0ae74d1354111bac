"""The in-memory form every data source returns, before splitting and validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RawDataset:
    """A loaded source.

    images:  float32 (N, C, H, W) in [0, 1] at the final image size. NaN/Inf are
             kept as they are so validation can report them.
    labels:  int64 (N,), indices into `class_names`.
    ids:     one string per image naming where it came from (a file path, or
             "mnist5k[123]"); validation errors quote these.
    unreadable: (id, reason) for items that could not be decoded at all
             (corrupt or truncated image, non-image file); they are not in
             `images` but make validation fail, naming the file.
    factors / poses / object_ids: only for sources that have them (shapes).
    """

    source: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    factors: np.ndarray | None = None  # float32 (N, F)
    factor_names: list[str] | None = None
    poses: np.ndarray | None = None  # float32 (N, P)
    pose_layout: list[str] | None = None
    object_ids: np.ndarray | None = None  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Listing:
    """What a source holds, before any pixel is decoded: `prepare`'s first pass.

    Everything but the pixels: labels, ids and (shapes) factors, poses and object
    ids, so the split can be made on them alone. `reader` decodes any slice of the
    items (data/decode.py); `channels` is None when only the files can tell (an
    image folder: their headers are probed). `unreadable` holds the items refused
    while listing (non-image files, refused symlinks), each with `before`, the
    number of listed items that came before it, so decode failures can be merged
    in the order the folder was walked.
    """

    source: str
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    ids: list[str]
    reader: Any  # an ArrayReader, FileReader, ... of N items
    channels: int | None
    unreadable: list[tuple[int, str, str]] = field(default_factory=list)  # (before, id, reason)
    empty_classes: list[str] = field(default_factory=list)
    factors: np.ndarray | None = None
    factor_names: list[str] | None = None
    poses: np.ndarray | None = None
    pose_layout: list[str] | None = None
    object_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def in_memory(raw: RawDataset) -> Listing:
    """A decoded RawDataset as a Listing (its images are the reader)."""
    from diffrep.data.decode import ArrayReader

    images = raw.images if raw.images.ndim == 4 else raw.images.reshape(len(raw.images), 1, *raw.images.shape[1:])
    return Listing(raw.source, np.asarray(raw.labels, np.int64), list(raw.class_names), list(raw.ids),
                   ArrayReader(images), images.shape[1], [(len(raw.labels), i, r) for i, r in raw.unreadable],
                   list(raw.empty_classes), raw.factors, raw.factor_names, raw.poses, raw.pose_layout, raw.object_ids)
