"""Seeded, stratified train/val/test split; by object when a source has several views per object.

Each class is shuffled with its own stream seeded by (seed, class), so adding
or removing one class leaves the other classes' split unchanged. A class with
n >= 2 items puts round(n * test_fraction) of them, clamped to [1, n-1], in
test; a class with a single item keeps it in train. Validation is then carved
out of what is left for training, with a second stream per class:
round(n * val_fraction) items, at least one, as long as one stays in train. The
test split does not depend on val_fraction, so adding validation keeps the
same test images. With object ids the unit is the object: all its views land
in one split (no view leakage), stratified by the object's label.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # int64 indices into the RawDataset, ascending
    test: np.ndarray
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _stratified(labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """Per split unit: 0 train, 1 val, 2 test."""
    side = np.zeros(len(labels), dtype=np.int8)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        k = min(max(int(round(n * test_fraction)), 1), n - 1) if n >= 2 else 0
        rng = np.random.default_rng([seed % 2**32, int(c) % 2**32])
        order = rng.permutation(idx)
        side[order[:k]] = 2
        rest = order[k:]
        v = min(max(int(round(n * val_fraction)), 1), len(rest) - 1) if len(rest) >= 2 and val_fraction > 0 else 0
        side[np.random.default_rng([seed % 2**32, int(c) % 2**32, 1]).permutation(rest)[:v]] = 1
    return side


def split_dataset(labels: np.ndarray, test_fraction: float, seed: int, object_ids: np.ndarray | None = None,
                  val_fraction: float = 0.0) -> Split:
    labels = np.asarray(labels, dtype=np.int64)
    if object_ids is None:
        side = _stratified(labels, test_fraction, val_fraction, seed)
    else:
        object_ids = np.asarray(object_ids, dtype=np.int64)
        objects, first, inverse = np.unique(object_ids, return_index=True, return_inverse=True)
        obj_labels = labels[first]  # (n_objects,)
        bad = np.flatnonzero(labels != obj_labels[inverse])
        if len(bad):
            raise ValueError(
                f"object {int(object_ids[bad[0]])} has views with different labels; "
                "the source must give every view of an object the object's label"
            )
        side = _stratified(obj_labels, test_fraction, val_fraction, seed)[inverse]
    return Split(train=np.flatnonzero(side == 0).astype(np.int64), test=np.flatnonzero(side == 2).astype(np.int64),
                 val=np.flatnonzero(side == 1).astype(np.int64))
