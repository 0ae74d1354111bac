"""Bad inputs, each refused by name with nothing written, or handled correctly (docs/faults.md, second table)."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
from conftest import make_cfg, make_imagefolder, write_image
from PIL import Image

from diffrep import audit
from diffrep.config import ConfigError, load_config, parse_config
from diffrep.data.sources import load_source


def _load(folder, size=8):
    return load_source(make_cfg(source="imagefolder", path=str(folder), image_size=size).data, seed=0)


# ---------------------------------------------------------------- params
@pytest.mark.parametrize("raw,key", [
    ({"soda": {"train": {"lr": float("nan")}}}, "soda.train.lr"),
    ({"ul": {"stage1": {"logsnr_z0": float("inf")}}}, "ul.stage1.logsnr_z0"),  # a field with no bounds
    ({"ldae": {"train": {"betas": [0.9, float("nan")]}}}, "ldae.train.betas.1"),
    ({"ldae": {"train": {"steps": -5}}}, "ldae.train.steps"),
    ({"feature_net": {"train": {"warmup_steps": -1}}}, "feature_net.train.warmup_steps"),
    ({"eval": {"base_steps": -3}}, "eval.base_steps"),
    ({"seed": -1}, "seed"),
])
def test_non_finite_and_negative_params_are_refused_by_key(raw, key):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "params.yaml")
    assert f"key '{key}'" in str(e.value)


def test_yaml_nan_and_inf_spellings_are_refused(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("soda:\n  train:\n    time_budget_s: .inf\n    grad_clip: .nan\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "soda.train.time_budget_s" in str(e.value) and "soda.train.grad_clip" in str(e.value)
    assert "finite" in str(e.value)


@pytest.mark.parametrize("stage,key", [("ul_stage1", "ul.stage1.prior.channel_mult"),
                                       ("ul_stage2", "ul.stage1.prior.channel_mult"),
                                       ("ldae", "ldae.vit.patch_size")])
def test_image_size_the_networks_cannot_halve_is_refused_at_stage_start(tmp_path, stage, key):
    from diffrep.stages import runner

    cfg = make_cfg(source="digits", image_size=12)  # UL's 3x3 latent grid cannot be halved; 8 does not divide 12
    with pytest.raises(ValueError) as e:
        with runner.stage(stage, cfg, tmp_path):
            pytest.fail("the stage body must not run")
    assert f"stage {stage}:" in str(e.value) and key in str(e.value) and "data.image_size=12" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # refused before the lock, the runtime or any output
    with runner.stage("soda", cfg, tmp_path):  # 12 = 3 * 4: SODA's two halvings are exact
        pass
    bad = parse_config({"data": {"source": "digits", "image_size": 12}, "soda": {"unet": {"channel_mult": [1, 2, 2, 2]}}})
    with pytest.raises(ValueError, match=r"soda.unet.channel_mult=\(1, 2, 2, 2\) halves .* multiple of 8"):
        with runner.stage("soda", bad, tmp_path):
            pass


# ---------------------------------------------------------------- image files
def test_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above this and raises above twice it
    root = make_imagefolder(tmp_path / "f", {"a": 2})
    write_image(root / "a" / "warned.png", "L", (40, 40))  # 1600 px: PIL only warns; refused here
    write_image(root / "a" / "bomb.png", "L", (50, 50))  # 2500 px: PIL's own error
    raw = _load(root)
    reasons = dict(raw.unreadable)
    assert set(reasons) == {"a/warned.png", "a/bomb.png"} and len(raw) == 2
    assert all("decompression bomb refused" in r and "MAX_IMAGE_PIXELS" in r for r in reasons.values())


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((8, 8), np.uint8)
    a[:, 4:] = 255  # stored: left half black, right half white
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "f" / "c").mkdir(parents=True)
    img.save(tmp_path / "f" / "c" / "rot.jpg", quality=100, exif=exif)
    img.save(tmp_path / "f" / "c" / "plain.jpg", quality=100)
    raw = _load(tmp_path / "f")
    x = dict(zip(raw.ids, raw.images[:, 0]))
    np.testing.assert_allclose(x["c/rot.jpg"], np.rot90(a, k=-1) / 255.0, atol=0.1)  # displayed: top black
    np.testing.assert_allclose(x["c/plain.jpg"], a / 255.0, atol=0.1)


def test_cmyk_jpeg_and_16_bit_png_are_converted(tmp_path):
    d = tmp_path / "f" / "c"
    d.mkdir(parents=True)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(d / "red.jpg", quality=100)  # no cyan: pure red
    deep = np.random.default_rng(0).integers(0, 65536, size=(8, 8), dtype=np.uint16)
    Image.fromarray(deep).save(d / "deep.png")
    assert Image.open(d / "deep.png").mode in ("I;16", "I")  # really 16 bits on disk
    raw = _load(tmp_path / "f")
    x = dict(zip(raw.ids, raw.images))
    assert raw.unreadable == [] and raw.images.shape[1] == 3
    np.testing.assert_allclose(x["c/red.jpg"].mean(axis=(1, 2)), [1, 0, 0], atol=0.02)
    np.testing.assert_allclose(x["c/deep.png"][0], deep / 65535.0, atol=1e-6)  # 16 bits kept, not 8


def test_multi_frame_images_are_refused_single_frame_gif_and_tiff_are_read(tmp_path):
    d = tmp_path / "f" / "c"
    d.mkdir(parents=True)
    frames = [Image.new("L", (8, 8), v) for v in (0, 128)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(d / "pages.tiff", save_all=True, append_images=frames[1:])
    frames[0].save(d / "anim.png", save_all=True, append_images=frames[1:])  # APNG
    frames[1].save(d / "one.gif")
    frames[1].save(d / "one.tif")
    raw = _load(tmp_path / "f")
    reasons = dict(raw.unreadable)
    assert set(reasons) == {"c/anim.gif", "c/pages.tiff", "c/anim.png"}
    assert "GIF with 2 frames" in reasons["c/anim.gif"] and "TIFF with 2 frames" in reasons["c/pages.tiff"]
    assert "PNG with 2 frames" in reasons["c/anim.png"]
    assert sorted(raw.ids) == ["c/one.gif", "c/one.tif"]
    np.testing.assert_allclose(raw.images, 128 / 255.0, atol=1e-6)


def test_symlinks_loops_outside_and_folders_are_refused(tmp_path):
    root = make_imagefolder(tmp_path / "f", {"a": 2, "b": 1})
    outside = write_image(tmp_path / "elsewhere" / "x.png", "L")
    os.symlink("loop.png", root / "a" / "loop.png")  # points at itself
    os.symlink(outside, root / "a" / "out.png")
    os.symlink("../a", root / "b" / "sub")  # a folder link (here: a cycle through the parent)
    os.symlink("../a/000.png", root / "b" / "alias.png")  # a file inside data.path: read
    os.symlink(tmp_path / "elsewhere", root / "c")  # a whole class folder outside
    raw = _load(root)
    reasons = dict(raw.unreadable)
    assert set(reasons) == {"a/loop.png", "a/out.png", "b/sub", "c"}
    assert "symlink loop" in reasons["a/loop.png"] and "outside data.path" in reasons["a/out.png"]
    assert "not followed" in reasons["b/sub"] and "outside data.path" in reasons["c"]
    assert raw.class_names == ["a", "b"] and sorted(raw.ids) == ["a/000.png", "a/001.png", "b/000.png", "b/alias.png"]


def test_prepare_names_every_bad_file_and_class_and_writes_nothing(tmp_path, monkeypatch):
    from diffrep.stages.prepare import run

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    root = make_imagefolder(tmp_path / "data" / "raw" / "f", {"a": 12, "b": 12})
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("only text in this class")
    write_image(root / "a" / "bomb.png", "L", (50, 50))
    os.symlink("/etc/hostname", root / "b" / "host.png")
    with pytest.raises(ValueError) as e:
        run(make_cfg(source="imagefolder", path="data/raw/f", image_size=8), tmp_path)
    msg = str(e.value)
    for named in ("notes", "notes/readme.txt", "a/bomb.png", "b/host.png"):
        assert named in msg, named
    assert not (tmp_path / "data" / "prepared").exists() and not (tmp_path / "metrics").exists()
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------- the lineage audit
def test_lineage_paths_outside_the_root_are_refused_unread(tmp_path, monkeypatch, capsys):
    root = tmp_path / "repo"
    (root / "metrics").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, root / "link.txt")
    read = []
    monkeypatch.setattr(audit, "path_hash", lambda p: read.append(str(p)) or "0" * 64)
    for bad in ("../secret.txt", str(secret), "link.txt"):
        lineage = {"stage": "s", "inputs": {"ok.txt": "0" * 64, bad: "0" * 64}, "outputs": {}}
        (root / "metrics" / "s.json").write_text(json.dumps({"x": 1, "lineage": lineage}))
        args = argparse.Namespace(metrics_file="metrics/s.json", key=None, json=False, root=str(root))
        assert audit.main(args) == audit.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"metrics/s.json records input {bad!r}" in err and "outside the project root" in err
    assert all(not p.endswith("secret.txt") and not p.endswith("link.txt") for p in read)
