"""`prepare` in chunks: the bytes written do not depend on data.chunk_size or data.workers (docs/data.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_cfg, make_imagefolder

from diffrep.data.chunks import decode_all, materialise
from diffrep.data.decode import FileReader
from diffrep.data.prepared import load_prepared, quantise
from diffrep.data.shapes import render_shapes
from diffrep.data.sources import list_source
from diffrep.data.split import split_dataset
from diffrep.io import path_hash
from diffrep.stages import prepare

SHAPES = {"n_objects": 30, "views_per_object": 3}  # 90 images


def _outputs(root):
    return {p: path_hash(root / p) for p in ("data/prepared", "data/validation.json")}


def test_digits_two_workers_and_odd_chunks_write_the_same_bytes(prepared_digits, tmp_path):
    root, _ = prepared_digits  # one chunk of 2048 >= 1797 images, in-process
    m = prepare.run(make_cfg(source="digits", image_size=8, chunk_size=333, workers=2), tmp_path)  # 1797 = 5*333+132
    assert m["chunks"] == {"chunk_size": 333, "workers": 2, "n_chunks": 6, "decode_passes": 1}
    assert _outputs(tmp_path) == _outputs(root)
    a = json.loads((tmp_path / "data/prepared/manifest.json").read_text())["source_info"]["content_sha256"]
    assert a == json.loads((root / "data/prepared/manifest.json").read_text())["source_info"]["content_sha256"]


def test_shapes_chunks_and_workers_write_the_same_bytes_as_one_render(tmp_path):
    cfg = dict(source="shapes", image_size=8, min_rows=8, shapes=SHAPES)
    prepare.run(make_cfg(**cfg, chunk_size=10), tmp_path / "a")  # in-process, 9 chunks
    m = prepare.run(make_cfg(**cfg, chunk_size=7, workers=2), tmp_path / "b")  # 90 = 12*7+6, two processes
    assert m["chunks"]["n_chunks"] == 13 and m["chunks"]["workers"] == 2
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")
    # and the rows are those of the whole-array renderer, split and quantised
    raw = render_shapes(SHAPES["n_objects"], SHAPES["views_per_object"], 8, seed=0)
    split = split_dataset(raw.labels, 0.2, 0, object_ids=raw.object_ids, val_fraction=0.1)
    prep = load_prepared(tmp_path / "b/data/prepared")
    prep.release_test()
    for name, idx in split.parts().items():
        assert np.array_equal(prep.images(name), quantise(raw.images[idx]))
        assert np.array_equal(prep.array(name, "object_ids"), raw.object_ids[idx])


def test_a_header_that_lies_about_channels_is_decoded_again(tmp_path, monkeypatch):
    f = make_imagefolder(tmp_path / "imgs", {"a": 3, "b": 3}, mode="L")
    listing = list_source(make_cfg(source="imagefolder", path=str(f), image_size=4).data, seed=0)
    assert listing.channels is None  # an image folder: its headers tell
    ref = materialise(listing, chunk_size=4)
    assert ref.images.shape == (6, 1, 4, 4)
    monkeypatch.setattr(FileReader, "probe", lambda self: np.full(len(self.rels), 3, np.int8))  # "RGB"
    d = decode_all(listing, chunk_size=4, workers=1, collect=True)
    assert d.passes == 2 and d.stats.shape == (1, 4, 4)  # the decoded pixels win
    assert np.array_equal(np.concatenate(d.images), ref.images)


def test_mixed_grey_and_rgb_folder_is_rgb_in_any_chunking(tmp_path):
    f = make_imagefolder(tmp_path / "imgs", {"a": 4, "b": 3}, mode="L")
    make_imagefolder(tmp_path / "rgb", {"b": 2}, mode="RGB")
    for p in (tmp_path / "rgb/b").iterdir():
        p.rename(f / "b" / f"rgb_{p.name}")
    listing = list_source(make_cfg(source="imagefolder", path=str(f), image_size=4).data, seed=0)
    whole, parts = materialise(listing, chunk_size=100), materialise(listing, chunk_size=3)
    assert whole.images.shape == (9, 3, 4, 4) and np.array_equal(whole.images, parts.images)
    assert np.array_equal(whole.images[0, 0], whole.images[0, 2])  # a grey image repeated to RGB


def test_unreadable_files_keep_the_folder_order_across_chunks(tmp_path):
    f = make_imagefolder(tmp_path / "imgs", {"a": 3, "b": 3})
    (f / "a" / "001.png").write_bytes(b"garbage")  # a decode failure, in the first chunk
    (f / "a" / "zz.txt").write_text("x")  # refused while listing, after a's images
    (f / "b" / "002.png").write_bytes(b"garbage")  # a decode failure, in the last chunk
    listing = list_source(make_cfg(source="imagefolder", path=str(f), image_size=4).data, seed=0)
    raw = materialise(listing, chunk_size=2)
    assert [i for i, _ in raw.unreadable] == ["a/001.png", "a/zz.txt", "b/002.png"]
    assert raw.ids == ["a/000.png", "a/002.png", "b/000.png", "b/001.png"] and raw.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"failed on 3 images: a/001\.png .*a/zz\.txt .*b/002\.png"):
        prepare.run(make_cfg(source="imagefolder", path=str(f), image_size=4, min_rows=2, chunk_size=2), tmp_path)
    assert not (tmp_path / "data/prepared").exists() and not list((tmp_path / "data").glob(".prepared*"))
