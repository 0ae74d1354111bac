"""The shapes pipeline (pipelines/shapes) end to end: its dvc.yaml in a temporary git repository, tiny params.

The end-to-end case takes ~75 s on 2 cores, so it runs in `make test-shapes`, not in `make test`.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from diffrep.config import deep_merge, load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_e2e import sh  # noqa: E402  (one way to run a command in the temp repo)

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "pipelines/shapes"
NET = {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [], "groups": 4, "heads": 1}
TRAIN = {"steps": 6, "batch_size": 16, "warmup_steps": 1, "ckpt_every": 100, "log_every": 3}
TINY = {
    "data": {"image_size": 8, "min_per_class": 1, "shapes": {"n_objects": 40, "views_per_object": 4}},
    "runtime": {"device": "cpu", "num_threads": 1},
    "soda": {"z_dim": 6, "encoder": {"width": 8, "stages": 2}, "unet": NET, "diffusion": {"sample_steps": 2},
             "train": TRAIN | {"eval_every": 3}, "eval_images": 4},  # the online val kNN on 3D views too
    "ul": {"stage1": {"encoder": {"width": 8, "stages": 2}, "prior": NET, "decoder": NET,
                      "decoder_diffusion": {"sample_steps": 2}, "train": TRAIN, "eval_images": 8}},
    "ldae": {"pca_dim": 4, "pca_fit_patches": 100, "vit": {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2},
             "train": TRAIN},
    "feature_net": {"width": 8, "train": TRAIN},
    "eval": {"bootstrap": 20, "dci": {"max_train": 60, "n_estimators": 3, "pca_dim": 4}},
    "shapes_eval": {"source_views": [1, 2], "max_objects": 6, "edit_pairs": 4, "interp_steps": 3,
                    "reader_pca_dim": 4, "bootstrap": 100},
}


def test_shapes_params_validate_and_set_every_field():
    from test_params import unset_fields

    from diffrep.config import Config

    load_config(SHAPES / "params.yaml")
    assert unset_fields(Config, yaml.safe_load((SHAPES / "params.yaml").read_text())) == []


def test_shared_stages_match_the_root_pipeline():
    """The stages both pipelines run (same code) declare the same deps, params and plots, so neither goes stale alone."""
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    shapes = yaml.safe_load((SHAPES / "dvc.yaml").read_text())["stages"]
    for name in ("prepare", "soda", "ul_stage1", "ldae", "feature_net", "linear_probe"):
        src = sorted(d for d in root[name]["deps"] if d.startswith("src/"))
        assert sorted(d.removeprefix("../../") for d in shapes[name]["deps"] if d.startswith("../../")) == src, name
        assert shapes[name]["params"] == root[name]["params"], name
        assert shapes[name].get("plots") == root[name].get("plots"), name


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in (".dvcignore", ".gitignore", "dvc.yaml", "params.yaml"):  # the root pipeline beside it
        shutil.copy(REPO / f, root)
    shutil.copytree(REPO / "data/raw", root / "data/raw")
    (root / "pipelines/shapes").mkdir(parents=True)
    shutil.copy(SHAPES / "dvc.yaml", root / "pipelines/shapes")
    params = deep_merge(yaml.safe_load((SHAPES / "params.yaml").read_text()), TINY)
    (root / "pipelines/shapes/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "tiny shapes pipeline", cwd=root)
    sh("dvc", "repro", "pipelines/shapes/dvc.yaml", cwd=root)
    return root / "pipelines/shapes"


@pytest.mark.slow
@pytest.mark.shapes_pipeline
def test_repro_writes_the_shapes_report_with_intervals(repo):
    m = json.loads((repo / "metrics/shapes_eval.json").read_text())
    nv = m["shapes_eval"]["novel_views"]["methods"]
    assert set(nv) == {"soda_k1", "soda_k2", "copy_source", "pose_mean"}
    assert all(r["psnr_ci95"][0] <= r["psnr"] <= r["psnr_ci95"][1] for r in nv.values())
    codes = m["shapes_eval"]["dci"]["codes"]
    assert {"soda", "ul", "ldae", "pca", "soda_random_init", "ul_random_init", "ldae_random_init"} <= set(codes)
    assert all(0 <= c["disentanglement"] <= 1 for c in codes.values())
    assert len(m["shapes_eval"]["control"]["groups"]) == 2  # one row per z sub-vector
    for f in ("shapes.md", "nvs.png", "edit.png", "interpolation.png", "dci_importance.png"):
        assert (repo / "reports" / f).is_file()
    assert m["lineage"]["stage"] == "shapes_eval"
    probe = json.loads((repo / "metrics/linear_probe.json").read_text())  # the probe of the shape class
    assert {"soda", "ul", "ldae", "raw_pixels", "pca"} <= set(probe["representations"])
    assert probe["settings"]["num_classes"] == 8
    assert "## Linear probe and kNN" in (repo / "reports/shapes.md").read_text()
    assert json.loads((repo / "metrics/soda.json").read_text())["novel_view_psnr"] > 0  # pose-conditioned SODA
    # its own lock, next to its own dvc.yaml; a second repro has nothing to do
    assert (repo / "dvc.lock").is_file()
    assert "didn't change" in sh("dvc", "repro", "pipelines/shapes/dvc.yaml", cwd=repo.parents[1]).stdout
    # `dvc repro` at the root is the root pipeline only: both default to the dvc.yaml of the working directory
    root_stages = sh("dvc", "stage", "list", cwd=repo.parents[1]).stdout
    assert "generation_eval" in root_stages and "shapes" not in root_stages
    assert "pipelines/shapes/dvc.yaml:shapes_eval" in sh("dvc", "stage", "list", "--all", cwd=repo.parents[1]).stdout


def test_lineage_of_a_pipeline_in_a_sub_folder_sees_changed_code(tmp_path):
    from diffrep.lineage import git_state

    (tmp_path / "src").mkdir()
    (tmp_path / "pipelines/shapes").mkdir(parents=True)
    (tmp_path / "src/code.py").write_text("x = 1\n")
    for cmd in (("git", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-qm", "code")):
        sh(*cmd, cwd=tmp_path)
    assert git_state(tmp_path / "pipelines/shapes")["dirty"] is False
    (tmp_path / "src/code.py").write_text("x = 2\n")
    assert git_state(tmp_path / "pipelines/shapes")["dirty"] is True
