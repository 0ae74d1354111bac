"""The train/val/test split: disjoint, stratified, val carved from train, test independent of val, by object."""
from __future__ import annotations

import numpy as np
import pytest

from diffrep.data.split import split_dataset


def test_three_disjoint_stratified_splits_and_test_does_not_move_with_val():
    labels = np.repeat(np.arange(5), 100)
    s = split_dataset(labels, 0.2, seed=0, val_fraction=0.1)
    parts = s.parts()
    allidx = np.concatenate(list(parts.values()))
    assert len(allidx) == 500 and len(np.unique(allidx)) == 500  # every item once
    for name, want in (("train", 70), ("val", 10), ("test", 20)):
        assert np.bincount(labels[parts[name]], minlength=5).tolist() == [want] * 5  # stratified
    no_val = split_dataset(labels, 0.2, seed=0)
    assert np.array_equal(no_val.test, s.test) and len(no_val.val) == 0  # same test images either way
    assert np.array_equal(np.sort(np.concatenate([s.train, s.val])), no_val.train)  # val comes out of train


def test_by_object_no_object_in_two_splits():
    objects = np.repeat(np.arange(60), 4)
    labels = objects % 3
    s = split_dataset(labels, 0.2, seed=1, object_ids=objects, val_fraction=0.2)
    sides = {name: set(objects[idx]) for name, idx in s.parts().items()}
    assert not (sides["train"] & sides["val"]) and not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"])
    assert all(len(v) > 0 for v in sides.values())


def test_tiny_class_keeps_one_training_item():
    s = split_dataset(np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1]), 0.3, seed=0, val_fraction=0.3)
    assert 0 in np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])[s.train]


def test_fractions_that_leave_nothing_to_train_on_are_refused():
    from diffrep.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="val_fraction"):
        parse_config({"data": {"test_fraction": 0.6, "val_fraction": 0.4}})


def test_the_test_split_is_locked_until_released(prepared_digits):
    from diffrep.data.prepared import TestSplitLocked, load_prepared

    root, _ = prepared_digits
    prep = load_prepared(root / "data/prepared")
    prep.images("val"), prep.labels("train")  # fine while choosing
    for read in (lambda: prep.images("test"), lambda: prep.labels("test"), lambda: prep.array("test", "poses")):
        with pytest.raises(TestSplitLocked, match="release_test"):
            read()
    prep.release_test()
    assert len(prep.images("test")) == prep.manifest["counts"]["test"]
