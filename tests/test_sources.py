"""Data sources (shapes, ranges, decoding rules, missing-data errors) and the train/test split."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from conftest import make_cfg, make_imagefolder, write_image
from PIL import Image

from diffrep.data.sources import SourceError, load_source, square_resize
from diffrep.data.split import split_dataset


def _check_raw(raw, n, c, s, k):
    assert raw.images.shape == (n, c, s, s) and raw.images.dtype == np.float32
    assert raw.labels.shape == (n,) and raw.labels.dtype == np.int64
    assert 0.0 <= raw.images.min() and raw.images.max() <= 1.0
    assert len(raw.ids) == n and len(raw.class_names) == k
    assert set(raw.labels.tolist()) <= set(range(k))


# ---------------------------------------------------------------- embedded sources
def test_mnist5k_is_5000_balanced_real_digits():
    raw = load_source(make_cfg(source="mnist5k", image_size=16).data, seed=0)
    _check_raw(raw, 5000, 1, 16, 10)
    assert np.bincount(raw.labels).tolist() == [500] * 10
    assert raw.images.mean() == pytest.approx(0.13, abs=0.03)  # MNIST's mean ink


def test_digits_native_size_is_exact_and_resizes(digits_raw):
    from sklearn.datasets import load_digits

    _check_raw(digits_raw, 1797, 1, 8, 10)
    np.testing.assert_allclose(digits_raw.images[:, 0], load_digits().images / 16.0, atol=1e-7)  # no resize at 8
    raw16 = load_source(make_cfg(source="digits", image_size=16).data, seed=0)
    _check_raw(raw16, 1797, 1, 16, 10)


def test_square_resize_crops_centre_and_antialiases():
    x = torch.zeros(1, 1, 4, 8)
    x[..., 2:6] = 1.0  # the centre 4x4 square is ones
    assert torch.equal(square_resize(x, 4), torch.ones(1, 1, 4, 4))
    noise = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    down = square_resize(noise, 16)
    # point-sampled bilinear keeps var/4 of white noise; a 4x antialiasing filter averages ~64 pixels
    assert down.var() < 0.1 * noise.var()
    assert down.min() >= 0 and down.max() <= 1  # non-negative weights: no overshoot


# ---------------------------------------------------------------- image folders
def test_imagefolder_modes_and_channel_rule(tmp_path):
    a = tmp_path / "mixed"
    write_image(a / "cat" / "grey.png", "L", (12, 8))  # non-square: centre crop
    write_image(a / "cat" / "rgb.PNG", "RGB", (8, 8), seed=1)  # upper-case suffix
    write_image(a / "cat" / "photo.jpg", "RGB", (16, 16), seed=2, fmt="JPEG")
    write_image(a / "dog" / "pal.png", "P", (8, 8), seed=3)
    Image.new("RGBA", (8, 8), (255, 255, 255, 0)).save(a / "dog" / "clear.png")  # fully transparent white
    Image.new("RGB", (8, 8), (255, 0, 0)).save(a / "dog" / "red.jpeg")
    raw = load_source(make_cfg(source="imagefolder", path=str(a), image_size=8).data, seed=0)
    _check_raw(raw, 6, 3, 8, 2)  # any colour image -> 3 channels for all
    assert raw.class_names == ["cat", "dog"] and raw.unreadable == [] and raw.empty_classes == []
    ids = dict(zip(raw.ids, range(len(raw.ids))))
    assert set(ids) == {"cat/grey.png", "cat/rgb.PNG", "cat/photo.jpg", "dog/pal.png", "dog/clear.png", "dog/red.jpeg"}
    grey = raw.images[ids["cat/grey.png"]]
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[0], grey[2])  # grey repeated to RGB
    expected = np.asarray(Image.open(a / "cat" / "grey.png"))[:, 2:10] / 255.0  # centre 8x8 of 12x8
    np.testing.assert_allclose(grey[0], expected, atol=1e-6)
    assert np.all(raw.images[ids["dog/clear.png"]] == 0.0)  # alpha composited on black
    red = raw.images[ids["dog/red.jpeg"]].mean(axis=(1, 2))
    assert red[0] > 0.95 and red[1] < 0.05 and red[2] < 0.05

    g = make_imagefolder(tmp_path / "grey", {"b": 2, "a": 3})
    raw = load_source(make_cfg(source="imagefolder", path=str(g), image_size=4).data, seed=0)
    _check_raw(raw, 5, 1, 4, 2)  # all greyscale -> 1 channel; resized 8 -> 4
    assert raw.class_names == ["a", "b"] and raw.labels.tolist() == [0, 0, 0, 1, 1]


def test_imagefolder_bad_files_are_recorded_not_raised(tmp_path):
    root = make_imagefolder(tmp_path / "f", {"cats": 3})
    (root / "cats" / "bad.png").write_bytes(np.random.default_rng(0).bytes(300))
    good = write_image(tmp_path / "big.png", "RGB", (64, 64))
    (root / "cats" / "trunc.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "cats" / "notes.txt").write_text("hello")
    (root / "cats" / ".DS_Store").write_bytes(b"\0\1")  # hidden: skipped
    (root / "empty").mkdir()
    raw = load_source(make_cfg(source="imagefolder", path=str(root), image_size=8).data, seed=0)
    assert len(raw) == 3 and raw.empty_classes == ["empty"] and raw.class_names == ["cats", "empty"]
    reasons = dict(raw.unreadable)
    assert set(reasons) == {"cats/bad.png", "cats/trunc.png", "cats/notes.txt"}
    assert "cannot decode" in reasons["cats/bad.png"] and "truncated" in reasons["cats/trunc.png"]
    assert "not an image" in reasons["cats/notes.txt"]


def test_imagefolder_missing_folder_and_relative_root(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        load_source(make_cfg(source="imagefolder", path=str(tmp_path / "nope")).data, seed=0)
    make_imagefolder(tmp_path / "rel", {"a": 2})
    raw = load_source(make_cfg(source="imagefolder", path="rel", image_size=8).data, seed=0, root=tmp_path)
    assert len(raw) == 2


# ---------------------------------------------------------------- torchvision (local files only)
def _write_idx(path, array: np.ndarray, magic: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def test_torchvision_reads_local_mnist_files_and_merges_splits(tmp_path):
    rng = np.random.default_rng(0)
    raw_dir = tmp_path / "MNIST" / "raw"
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 12, 12)), 2051)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
    raw = load_source(make_cfg(source="torchvision", path=f"MNIST:{tmp_path}", image_size=12).data, seed=0)
    _check_raw(raw, 10, 1, 12, 10)
    assert raw.labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert raw.ids[0] == "MNIST:train[0]" and raw.ids[-1] == "MNIST:test[3]"


def test_torchvision_generic_pil_dataset(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Tiny:  # no .data array: the per-item PIL path
        classes = ["a", "b"]

        def __init__(self, root, train=True, download=False, transform=None):
            self.n, self.transform = (3 if train else 2), transform

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.new("RGB", (10, 6), (0, 0, 255)), i % 2

    monkeypatch.setattr(tvd, "Tiny", Tiny, raising=False)
    raw = load_source(make_cfg(source="torchvision", path=f"Tiny:{tmp_path}", image_size=4).data, seed=0)
    _check_raw(raw, 5, 3, 4, 2)
    np.testing.assert_allclose(raw.images[:, 2], 1.0)


def test_torchvision_missing_files_say_download_is_disabled(tmp_path):
    with pytest.raises(SourceError) as e:
        load_source(make_cfg(source="torchvision", path=f"CIFAR10:{tmp_path}").data, seed=0)
    msg = str(e.value)
    assert "CIFAR10" in msg and str(tmp_path) in msg and "download" in msg.lower()
    with pytest.raises(SourceError, match="no dataset 'Nope'"):
        load_source(make_cfg(source="torchvision", path=f"Nope:{tmp_path}").data, seed=0)
    with pytest.raises(SourceError, match="Name:root"):
        load_source(make_cfg(source="torchvision", path="CIFAR10").data, seed=0)


# ---------------------------------------------------------------- split
def test_split_is_stratified_seeded_and_complete():
    labels = np.repeat(np.arange(4), [50, 30, 20, 1])
    a = split_dataset(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([a.train, a.test])), np.arange(len(labels)))
    assert np.bincount(labels[a.test], minlength=4).tolist() == [10, 6, 4, 0]  # a singleton class stays in train
    b = split_dataset(labels, 0.2, seed=0)
    c = split_dataset(labels, 0.2, seed=1)
    assert np.array_equal(a.test, b.test) and not np.array_equal(a.test, c.test)
    # each class has its own random stream: dropping class 0 leaves the other classes' split unchanged
    d = split_dataset(labels[50:], 0.2, seed=0)
    assert np.array_equal(d.test + 50, a.test[a.test >= 50])


def test_split_by_object_keeps_views_together():
    obj = np.repeat(np.arange(40), 5)  # 40 objects x 5 views
    labels = obj % 4
    s = split_dataset(labels, 0.2, seed=3, object_ids=obj)
    assert not set(obj[s.train]) & set(obj[s.test])
    assert len(s.test) == 40 and np.bincount(labels[s.test]).tolist() == [10] * 4  # 2 objects x 5 views per class
    with pytest.raises(ValueError, match="different labels"):
        split_dataset(np.arange(10) % 2, 0.2, seed=0, object_ids=np.repeat(np.arange(5), 2))


# ---------------------------------------------------------------- shapes (rendered by diffrep.data.shapes)
def test_shapes_source_has_objects_and_poses():
    cfg = make_cfg(source="shapes", image_size=8, shapes={"n_objects": 6, "views_per_object": 2})
    raw = load_source(cfg.data, seed=0)
    _check_raw(raw, 12, 3, 8, len(raw.class_names))
    assert raw.object_ids.shape == (12,) and raw.poses.shape[0] == 12 and raw.factors.shape[0] == 12
    s = split_dataset(raw.labels, 0.5, seed=0, object_ids=raw.object_ids)
    assert not set(raw.object_ids[s.train]) & set(raw.object_ids[s.test])
