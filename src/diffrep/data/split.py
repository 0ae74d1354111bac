"""Seeded, stratified train/test split; by object when a source has several views per object.

Each class is shuffled with its own stream seeded by (seed, class), so adding
or removing one class leaves the other classes' split unchanged. A class with
n >= 2 items puts round(n * test_fraction) of them, clamped to [1, n-1], in
test; a class with a single item keeps it in train. With object ids the unit
is the object: all its views land on one side (no view leakage), stratified by
the object's label.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # int64 indices into the RawDataset, ascending
    test: np.ndarray


def _stratified(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask over `labels` (one entry per split unit)."""
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        k = min(max(int(round(n * test_fraction)), 1), n - 1) if n >= 2 else 0
        rng = np.random.default_rng([seed % 2**32, int(c) % 2**32])
        test[rng.permutation(idx)[:k]] = True
    return test


def split_dataset(labels: np.ndarray, test_fraction: float, seed: int, object_ids: np.ndarray | None = None) -> Split:
    labels = np.asarray(labels, dtype=np.int64)
    if object_ids is None:
        test = _stratified(labels, test_fraction, seed)
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
        test = _stratified(obj_labels, test_fraction, seed)[inverse]
    return Split(train=np.flatnonzero(~test).astype(np.int64), test=np.flatnonzero(test).astype(np.int64))
