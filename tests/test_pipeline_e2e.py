"""End to end: the real dvc.yaml in a temporary git repository, tiny params, `dvc repro`, then the audit."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_dvc_repo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "seed": 0,
    "data": {"source": "digits", "image_size": 8, "test_fraction": 0.2},
    "runtime": {"device": "cpu", "num_threads": 1},
    "soda": {
        "z_dim": 8,
        "encoder": {"width": 8, "depth": 1, "stages": 2},
        "unet": {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [4], "groups": 4, "heads": 1},
        "diffusion": {"sample_steps": 3},
        "train": {"steps": 12, "batch_size": 32, "warmup_steps": 2, "ckpt_every": 5, "log_every": 4},
        "eval_images": 16,
    },
    "feature_net": {"width": 8, "train": {"steps": 10, "batch_size": 64, "ckpt_every": 100, "log_every": 5}},
    "eval": {"batch_size": 250},  # fid_reference's one param
    "probe": {"knn_k": [10, 20, 50], "knn_temperature": 0.07},  # soda's online val kNN settings (off here)
}
STAGES = ["prepare", "soda", "feature_net", "fid_reference"]


def sh(*cmd, cwd, check=True, env_extra=None):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(cwd / ".dvc-site"), GX_ANALYTICS_ENABLED="false",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               **(env_extra or {}))
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@contextlib.contextmanager
def flipped_last_byte(target: Path):
    """The file with its last byte flipped for the duration of the block, then restored."""
    original = target.read_bytes()
    try:
        target.chmod(0o644)
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        yield
    finally:
        target.write_bytes(original)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tiny_dvc_repo(root, STAGES, TINY, sh)  # only the stages this test covers, so it stays small as the pipeline grows
    sh("dvc", "repro", cwd=root)
    return root


def test_repro_writes_every_stage_output_with_lineage(repo):
    for stage in STAGES:
        m = json.loads((repo / f"metrics/{stage}.json").read_text())
        lin = m["lineage"]
        assert lin["stage"] == stage and lin["git"]["dirty"] is False and lin["outputs"]
    assert (repo / "data/prepared/manifest.json").is_file() and (repo / "models/soda/model.pt").is_file()
    soda = json.loads((repo / "metrics/soda.json").read_text())
    assert soda["steps"] == 12 and soda["images_per_s"] > 0 and soda["recon_psnr"] > 0
    assert (repo / "metrics/soda_loss.tsv").read_text().startswith("step\tloss")


def test_second_repro_is_a_fast_noop(repo):
    t0 = time.perf_counter()
    out = sh("dvc", "repro", cwd=repo)
    assert time.perf_counter() - t0 < 10  # the issue asks < 3 s on an idle machine; CI shares its cores
    assert "Running stage" not in out.stdout


def test_lineage_intact_then_broken_by_a_modified_prepared_file(repo):
    ok = sh("diffrep", "lineage", "metrics/soda.json", "--key", "recon_psnr", cwd=repo, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "prepare" in ok.stdout and "soda" in ok.stdout
    with flipped_last_byte(repo / "data/prepared/train_labels.npy"):
        bad = sh("diffrep", "lineage", "metrics/soda.json", cwd=repo, check=False)
        assert bad.returncode == 1 and "data/prepared CHANGED" in bad.stdout


def test_reference_statistics_round_trip_and_lineage_checks_their_hash(repo):
    from diffrep.eval.reference import load_reference
    from diffrep.io import ArtifactError

    features, manifest = load_reference(repo / "data/fid_reference")
    meta = json.loads((repo / "metrics/fid_reference.json").read_text())
    assert features.shape == (manifest["n"], manifest["dim"]) and meta["sha256"] == manifest["files"][manifest["file"]]
    ok = sh("diffrep", "lineage", "metrics/fid_reference.json", cwd=repo, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with flipped_last_byte(repo / "data/fid_reference" / manifest["file"]):
        bad = sh("diffrep", "lineage", "metrics/fid_reference.json", cwd=repo, check=False)
        assert bad.returncode == 1 and "data/fid_reference CHANGED" in bad.stdout
        with pytest.raises(ArtifactError, match="sha256"):
            load_reference(repo / "data/fid_reference")
