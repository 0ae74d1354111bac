"""The `prepare` stage: the success path and its artifacts, the prepared-data loader, every bad input."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cfg, make_imagefolder, write_image

from diffrep.data.prepared import load_prepared
from diffrep.data.split import Split, split_dataset
from diffrep.data.types import in_memory
from diffrep.io import ArtifactError, file_hash, path_hash
from diffrep.stages import prepare

OUTPUTS = ("data/prepared", "data/validation.json", "metrics")


def _nothing_written(root: Path) -> bool:
    return not any((root / p).exists() for p in OUTPUTS)


# ---------------------------------------------------------------- success path
def test_prepare_writes_verified_artifacts(prepared_digits, digits_raw):
    root, metrics = prepared_digits
    prep = load_prepared(root / "data/prepared")
    m = prep.manifest
    assert m["source"] == "digits" and m["image_shape"] == [1, 8, 8] and m["num_classes"] == 10
    assert m["counts"] == {"train": 1259, "val": 179, "test": 359} and sum(m["class_counts"]["test"]) == 359
    for name, digest in m["files"].items():
        assert file_hash(root / "data/prepared" / name) == digest
    assert prep.images("train").dtype == np.uint8 and prep.images("train").shape == (1259, 1, 8, 8)
    prep.release_test()
    assert prep.labels("test").dtype == np.int64 and prep.array("train", "poses") is None
    # the arrays are the seeded split of the source, quantised as round(x * 255); images_float maps to [-1, 1]
    split = split_dataset(digits_raw.labels, 0.2, seed=0, val_fraction=0.1)
    assert np.array_equal(prep.images("train"), np.rint(digits_raw.images[split.train] * 255).astype(np.uint8))
    assert np.array_equal(prep.labels("test"), digits_raw.labels[split.test])
    x = prep.images_float("train")
    assert x.dtype.is_floating_point and x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(np.rint(x.numpy() * 127.5 + 127.5).astype(np.uint8), prep.images("train"))

    assert metrics["counts"] == {"train": 1259, "val": 179, "test": 359, "total": 1797}
    assert metrics["class_balance"]["test"]["0"] == m["class_counts"]["test"][0]  # by class name
    assert metrics["validation"] == {"success": True, "n_expectations": 11, "failed": []}
    assert set(metrics["seconds"]) == {"list", "decode", "load", "validate", "write", "total"}
    assert metrics["chunks"] == {"chunk_size": 2048, "workers": 1, "n_chunks": 1, "decode_passes": 1}
    assert metrics["class_balance"]["max_min_ratio"]["train"] >= 1.0
    lin = json.loads((root / "metrics/prepare.json").read_text())["lineage"]
    assert lin["stage"] == "prepare" and lin["inputs"] == {} and lin["params"]["source"]["name"] == "digits"
    assert lin["outputs"]["data/prepared"] == path_hash(root / "data/prepared")
    report = json.loads((root / "data/validation.json").read_text())
    assert report["success"] and all(c["success"] for c in report["checks"])


def test_prepare_is_reproducible_byte_for_byte(prepared_digits, tmp_path):
    root, _ = prepared_digits
    prepare.run(make_cfg(source="digits", image_size=8), tmp_path)
    for p in ("data/prepared", "data/validation.json"):
        assert path_hash(tmp_path / p) == path_hash(root / p)


def test_load_prepared_detects_tampering(prepared_digits, tmp_path):
    src, _ = prepared_digits
    d = tmp_path / "prepared"
    shutil.copytree(src / "data/prepared", d)
    arr = np.load(d / "test_labels.npy")
    arr[0] = (arr[0] + 1) % 10
    np.save(d / "test_labels.npy", arr)
    with pytest.raises(ArtifactError, match=r"test_labels\.npy.*changed.*dvc repro prepare"):
        load_prepared(d)
    unverified = load_prepared(d, verify=False)
    unverified.release_test()
    assert unverified.labels("test")[0] == arr[0]  # verify=False skips hashing only

    np.save(d / "test_labels.npy", arr[:-1])  # wrong length, manifest hash updated to match
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["test_labels.npy"] = file_hash(d / "test_labels.npy")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"test_labels\.npy: expected int64 \(359,\)"):
        load_prepared(d)
    (d / "train_images.npy").unlink()
    with pytest.raises(ArtifactError, match=r"train_images\.npy: missing"):
        load_prepared(d)
    with pytest.raises(ArtifactError, match="manifest.json: not found"):
        load_prepared(tmp_path / "nothing")


def test_shapes_prepare_keeps_objects_and_poses(tmp_path):
    cfg = make_cfg(source="shapes", image_size=8, test_fraction=0.25, min_rows=8,
                   shapes={"n_objects": 8, "views_per_object": 2})
    prepare.run(cfg, tmp_path)
    prep = load_prepared(tmp_path / "data/prepared")
    prep.release_test()
    assert prep.image_shape == (3, 8, 8) and prep.manifest["pose_layout"]
    tr, va, te = (prep.array(s, "object_ids") for s in ("train", "val", "test"))
    assert len(tr) + len(va) + len(te) == 16 and not set(tr) & set(te) and not set(va) & (set(tr) | set(te))
    assert prep.array("test", "poses").dtype == np.float32 and prep.array("train", "factors").shape[0] == len(tr)


def test_imagefolder_prepare_records_the_folder_hash(tmp_path, capsys):
    f = make_imagefolder(tmp_path / "data/raw/imgs", {"cats": 5, "dogs": 5}, mode="RGB")
    metrics = prepare.run(make_cfg(source="imagefolder", path="data/raw/imgs", image_size=4, min_rows=4), tmp_path)
    src = metrics["lineage"]["params"]["source"]
    assert src["name"] == "imagefolder" and src["path_hash"] == path_hash(f)
    assert src["tracked_by_dvc"] is True and "warning" not in capsys.readouterr().err
    prep = load_prepared(tmp_path / "data/prepared")
    assert prep.image_shape == (3, 4, 4) and prep.class_names == ["cats", "dogs"]
    assert prep.manifest["class_counts"] == {"train": [3, 3], "val": [1, 1], "test": [1, 1]}


def test_a_folder_outside_data_raw_is_flagged_untracked(tmp_path, capsys):
    make_imagefolder(tmp_path / "elsewhere", {"cats": 5, "dogs": 5})
    metrics = prepare.run(make_cfg(source="imagefolder", path="elsewhere", image_size=4, min_rows=4), tmp_path)
    assert metrics["lineage"]["params"]["source"]["tracked_by_dvc"] is False
    err = capsys.readouterr().err
    assert "'elsewhere' is outside data/raw/" in err and "dvc repro -f prepare" in err


# ---------------------------------------------------------------- bad inputs: named error, nothing written
def _folder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "imgs", {"cats": 5, "dogs": 5})


def _fail(cfg, root: Path, *needles: str) -> str:
    with pytest.raises(ValueError) as e:
        prepare.run(cfg, root)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in:\n{msg}"
    assert _nothing_written(root)
    return msg


def _imgcfg(folder: Path, **kw):
    return make_cfg(**{"source": "imagefolder", "path": str(folder), "image_size": 8, "min_rows": 4, **kw})


def test_corrupt_truncated_and_non_image_files_are_named(tmp_path):
    f = _folder(tmp_path)
    (f / "cats" / "bad.png").write_bytes(b"\x89PNG not really" + bytes(200))
    good = write_image(tmp_path / "big.png", "RGB", (64, 64))
    (f / "dogs" / "trunc.png").write_bytes(good.read_bytes()[:2000])
    (f / "dogs" / "notes.txt").write_text("not an image")
    msg = _fail(_imgcfg(f), tmp_path, "expectation 'image readable' failed on 3 images",
                "cats/bad.png", "dogs/trunc.png", "dogs/notes.txt", "truncated")
    assert msg.count("expectation '") == 1  # unreadable files fail only the readability check


def test_empty_class_folder_is_named(tmp_path):
    f = _folder(tmp_path)
    (f / "birds").mkdir()
    _fail(_imgcfg(f), tmp_path, "at least 2 images per class' failed on 1 class: birds (class folder has no images)")


def test_too_few_images(tmp_path):
    f = make_imagefolder(tmp_path / "imgs", {"a": 3, "b": 3})
    _fail(_imgcfg(f, min_rows=20), tmp_path, "at least 20 images in all' failed: found 6")
    _fail(_imgcfg(f, min_per_class=4), tmp_path, "at least 4 images per class' failed on 2 classes: a, b")


def _patched(monkeypatch, raw, split=None):
    monkeypatch.setattr(prepare, "list_source", lambda cfg, seed, root=None: in_memory(raw))
    if split is not None:
        monkeypatch.setattr(prepare, "split_dataset", lambda *a, **k: split)


def _copy(raw):
    return dataclasses.replace(raw, images=raw.images.copy(), labels=raw.labels.copy(), ids=list(raw.ids))


def test_nan_pixels_are_named(tmp_path, monkeypatch, digits_raw):
    raw = _copy(digits_raw)
    raw.images[7, 0, 3, 3] = np.nan
    raw.images[9] = np.inf
    _patched(monkeypatch, raw)
    msg = _fail(make_cfg(source="digits", image_size=8), tmp_path,
                "expectation 'no NaN or Inf pixels' failed on 2 images: digits[7], digits[9]")
    assert "pixel values" not in msg  # NaN/Inf are reported once, by the non-finite check


def test_out_of_range_pixels_and_labels_are_named(tmp_path, monkeypatch, digits_raw):
    raw = _copy(digits_raw)
    raw.images[4] *= 2.0
    raw.labels[11] = 10
    raw.labels[12] = -1
    _patched(monkeypatch, raw)
    _fail(make_cfg(source="digits", image_size=8), tmp_path,
          "expectation 'pixel values within [0, 1]' failed on 1 image: digits[4]",
          "expectation 'label in the 10 declared classes' failed on 2 images: digits[11], digits[12]")


def test_wrong_image_shape_is_named(tmp_path, monkeypatch, digits_raw):
    _patched(monkeypatch, digits_raw)  # 8x8 images where the params declare 16x16
    _fail(make_cfg(source="digits", image_size=16), tmp_path,
          "expectation 'image shape is 1x16x16' failed on 1797 images: digits[0], digits[1]", "and 1787 more")


@pytest.mark.parametrize("sides", [("train", "test"), ("val", "test"), ("train", "val")])
def test_a_duplicate_across_any_two_splits_is_named(tmp_path, monkeypatch, sides):
    f = _folder(tmp_path)
    shutil.copy(f / "cats" / "000.png", f / "dogs" / "copy_of_cat.png")
    from diffrep.data.sources import load_source

    raw = load_source(_imgcfg(f).data, seed=0)
    i, j = raw.ids.index("cats/000.png"), raw.ids.index("dogs/copy_of_cat.png")
    rest = [k for k in range(len(raw)) if k not in (i, j)]
    parts = {"train": rest[:4], "val": rest[4:6], "test": rest[6:]}
    parts[sides[0]] = [i, *parts[sides[0]]]
    parts[sides[1]] = [j, *parts[sides[1]]]
    _patched(monkeypatch, raw, Split(**{k: np.array(sorted(v)) for k, v in parts.items()}))
    _fail(_imgcfg(f), tmp_path, "expectation 'no image in two splits (train, val, test)' failed on 2 images",
          f"cats/000.png (same pixels as dogs/copy_of_cat.png in {sides[1]})")


def test_failure_keeps_previous_good_output(tmp_path, monkeypatch, digits_raw):
    cfg = make_cfg(source="digits", image_size=8)
    _patched(monkeypatch, digits_raw)
    prepare.run(cfg, tmp_path)
    before = {p: path_hash(tmp_path / p) for p in OUTPUTS}
    raw = _copy(digits_raw)
    raw.images[0, 0, 0, 0] = np.nan
    _patched(monkeypatch, raw)
    with pytest.raises(ValueError, match="NaN"):
        prepare.run(cfg, tmp_path)
    assert {p: path_hash(tmp_path / p) for p in OUTPUTS} == before


# ---------------------------------------------------------------- CLI end to end
def _cli(root: Path, data: str) -> subprocess.Popen:
    (root / "params.yaml").write_text(f"seed: 0\ndata:\n{data}")
    cmd = [sys.executable, "-m", "diffrep.cli", "stage", "prepare",
           "--params", str(root / "params.yaml"), "--root", str(root)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_prepare_exit_codes(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    f = _folder(bad)
    (f / "dogs" / "broken.png").write_bytes(b"garbage")
    # both runs at once: each pays the torch + GX import, so this halves the wall time on 2 cores
    procs = [_cli(good, "  source: digits\n  image_size: 8\n"),
             _cli(bad, "  source: imagefolder\n  path: imgs\n  image_size: 8\n  min_rows: 4\n")]
    (out_good, err_good), (out_bad, err_bad) = (p.communicate(timeout=300) for p in procs)

    assert procs[0].returncode == 0, err_good
    assert "[prepare] digits: 1259 train / 179 val / 359 test" in out_good
    assert load_prepared(good / "data/prepared").manifest["counts"]["test"] == 359

    assert procs[1].returncode == 1, err_bad
    assert "dogs/broken.png" in err_bad and "image readable" in err_bad
    assert "Traceback" not in err_bad and _nothing_written(bad)


def test_the_top_level_seed_replicates_training_on_the_same_data(prepared_digits, tmp_path):
    from diffrep.config import parse_config

    root, _ = prepared_digits
    prepare.run(parse_config({"seed": 7, "data": {"source": "digits", "image_size": 8}}), tmp_path / "s7")
    assert path_hash(tmp_path / "s7/data/prepared") == path_hash(root / "data/prepared")  # same split, same bytes
    prepare.run(parse_config({"data": {"source": "digits", "image_size": 8, "seed": 1}}), tmp_path / "d1")
    other = load_prepared(tmp_path / "d1/data/prepared")
    assert not np.array_equal(other.labels("train"), load_prepared(root / "data/prepared").labels("train"))
