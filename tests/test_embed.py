"""`diffrep embed` and `diffrep export-encoder`: the probe's features out, the same numbers, bad inputs refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffrep.cli import main
from diffrep.config import parse_config

TINY = {"data": {"source": "digits", "image_size": 8}, "runtime": {"device": "cpu"},
        "probe": {"seeds": [0, 1], "epochs": 5, "pca_dim": 8, "bootstrap": 100, "random_init": False},
        "ldae": {"pca_dim": 4, "pca_fit_patches": 1000, "vit": {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2},
                 "train": {"steps": 10, "batch_size": 32, "ckpt_every": 10, "log_every": 5}}}


@pytest.fixture(scope="module")
def trained(prepared_digits, tmp_path_factory):
    """A tiny l-DAE and the linear_probe stage run on it: (root, linear_probe metrics)."""
    from diffrep.stages import ldae, linear_probe

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("embed")
    shutil.copytree(prepared_digits[0] / "data", root / "data")
    cfg = parse_config(TINY, "test")
    ldae.run(cfg, root)
    return root, linear_probe.run(cfg, root)


def embed(root, *args) -> int:
    return main(["embed", str(root / "models/ldae"), *map(str, args)])


def test_embedded_splits_probe_to_the_linear_probe_stage_numbers(trained, tmp_path):
    from diffrep.data.prepared import load_prepared
    from diffrep.eval.probe import Probe

    root, lp = trained
    feats = {}
    for s in ("train", "val", "test"):
        assert embed(root, "--split", s, "--root", root, "--out", tmp_path / f"{s}.npy") == 0
        feats[s] = torch.from_numpy(np.load(tmp_path / f"{s}.npy"))
    side = json.loads((tmp_path / "test.json").read_text())
    prep = load_prepared(root / "data/prepared")
    prep.release_test()
    n_test = len(prep.labels("test"))
    assert side["ids"] == [f"test[{i}]" for i in range(n_test)] and side["manifest"]["dim"] == feats["test"].shape[1]
    assert side["manifest"]["layout"] == {"what": "l-DAE encoder tokens, flattened (token row-major, then channel)",
                                          "shape": [4, 16]} and feats["test"].shape == (n_test, 64)
    assert len(side["manifest"]["model_sha256"]) == 64 and side["manifest"]["kind"] == "ldae"

    # the project's own probe on these features gives exactly the stage's numbers
    cfg = parse_config(TINY, "test")
    y = {s: torch.from_numpy(prep.labels(s)) for s in feats}
    probe = Probe(cfg.probe, y["train"], prep.num_classes, cfg.seed)
    choice = probe.choose((feats["train"], feats["val"]), y["val"])
    summary, scores = probe.report([(feats["train"], feats["test"])], y["test"], choice)
    assert summary["linear"]["acc"] == lp["probe_ldae"] and summary["knn"]["acc"] == lp["knn_ldae"]
    saved = np.load(root / "results/linear_probe/scores_ldae_linear.npy")
    assert np.array_equal(scores["linear"].float().numpy(), saved)  # image by image, not only the mean


def test_an_image_folder_gives_the_split_features_and_pt_loads_weights_only(trained, tmp_path):
    from PIL import Image

    from diffrep.data.prepared import load_prepared

    root, _ = trained
    prep = load_prepared(root / "data/prepared")
    prep.release_test()
    imgs = prep.images("test")[:30]  # uint8 (30, 1, 8, 8)
    for i, a in enumerate(imgs):
        (tmp_path / "in" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a[0]).save(tmp_path / "in" / f"c{i % 3}" / f"{i:02d}.png")
    assert embed(root, "--images", tmp_path / "in", "--out", tmp_path / "f.pt") == 0
    got = torch.load(tmp_path / "f.pt", weights_only=True)
    assert embed(root, "--split", "test", "--root", root, "--out", tmp_path / "t.npy") == 0
    ref = torch.from_numpy(np.load(tmp_path / "t.npy"))
    order = [int(p.split("/")[1][:2]) for p in got["ids"]]  # sorted paths: c0/00.png, c0/03.png, ...
    assert got["ids"][0] == "c0/00.png" and sorted(order) == list(range(30))
    assert torch.equal(got["features"], ref[order])  # PNG round trip + quantisation: the same bytes in, same out


@pytest.mark.parametrize("case, needle", [
    ("text", "notes.txt: not an image file"),
    ("rgb", "3 channel(s), the model reads 1"),
    ("size", "10x10 pixels, the model reads 8x8"),
    ("empty", "no image files found"),
])
def test_bad_image_folders_are_refused_by_name_and_nothing_is_written(trained, tmp_path, capsys, case, needle):
    from conftest import write_image

    root, _ = trained
    d = tmp_path / "in"
    d.mkdir()
    if case != "empty":
        write_image(d / "ok.png", "L", (8, 8))
    if case == "text":
        (d / "notes.txt").write_text("hello")
    if case == "rgb":
        write_image(d / "colour.png", "RGB", (8, 8))
    if case == "size":
        write_image(d / "big.png", "L", (10, 10))
    assert embed(root, "--images", d, "--out", tmp_path / "f.npy") == 1
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no features, no manifest, no temp file


def test_a_model_without_a_representation_is_refused(tmp_path, capsys):
    from diffrep.models.artifact import save_model

    save_model(tmp_path / "m", torch.nn.Linear(2, 2), kind="ul_stage2", section={}, image_shape=(1, 8, 8))
    assert main(["embed", str(tmp_path / "m"), "--split", "test", "--out", str(tmp_path / "f.npy")]) == 1
    assert "holds a 'ul_stage2' model, which has no representation to embed" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "m"), "--split", "test", "--out", str(tmp_path / "f.csv")]) == 1
    assert "must end in .npy" in capsys.readouterr().err
    assert not (tmp_path / "f.npy").exists()


def test_exported_encoder_alone_reproduces_the_features(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from diffrep.eval.features import feature_fn
    from diffrep.models.artifact import load_model

    root, _ = trained
    out = tmp_path / "enc.safetensors"
    assert main(["export-encoder", str(root / "models/ldae"), "--out", str(out)]) == 0
    tensors = load_file(out)
    assert any(k.startswith("net.blocks.0.") for k in tensors) and "tokenizer.basis" in tensors
    assert not any(k.startswith(("net.blocks.1.", "net.out.", "net.ada_out.")) for k in tensors)  # no decoder
    with safe_open(out, "pt") as f:
        assert f.metadata()["kind"] == "ldae" and json.loads(f.metadata()["image_shape"]) == [1, 8, 8]
    trained_model = load_model(root / "models/ldae", "ldae")
    fresh = load_model(root / "models/ldae", "ldae", init_seed=123)  # other weights everywhere ...
    missing = fresh.load_state_dict(tensors, strict=False).missing_keys  # ... but the encoder's
    assert missing and all(not k.startswith("tokenizer.") for k in missing)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    assert torch.equal(feature_fn(fresh, "ldae")(x), feature_fn(trained_model, "ldae")(x))
