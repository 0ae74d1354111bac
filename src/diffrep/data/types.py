"""The in-memory form every data source returns, before splitting and validation."""
from __future__ import annotations

from dataclasses import dataclass, field

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
