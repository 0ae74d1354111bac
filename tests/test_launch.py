"""runtime.nproc_per_node / nnodes: `diffrep stage X` starts its own DDP workers (train/launch.py).

The end-to-end cases are slow (each worker is a fresh interpreter importing torch): `make scale` runs them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffrep.config import RuntimeConfig
from diffrep.train.launch import DDP_STAGES, should_launch, workers_per_node

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_dvc_repo  # noqa: E402
from test_pipeline_e2e import sh as _sh  # noqa: E402  (one way to run a command in a temp repo)


def sh(*cmd, cwd, env_extra=None, check=True):  # workers on one thread each
    return _sh(*cmd, cwd=cwd, check=check, env_extra={"OMP_NUM_THREADS": "1", **(env_extra or {})})

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "seed": 0,
    "data": {"source": "digits", "image_size": 8, "test_fraction": 0.2},
    "runtime": {"device": "cpu", "num_threads": 1},
    "feature_net": {"width": 8, "train": {"steps": 12, "batch_size": 64, "ckpt_every": 5, "log_every": 4}},
}
TIMING = ("images_per_s", "train_s", "wall_s", "lineage")


def test_only_training_stages_launch_and_never_from_inside_a_worker():
    two = RuntimeConfig(nproc_per_node=2)
    assert should_launch("soda", two, environ={}) and should_launch("feature_net", two, environ={})
    assert not should_launch("soda", two, environ={"WORLD_SIZE": "2"})  # a worker runs the stage itself
    assert not should_launch("prepare", two, environ={}) and not should_launch("linear_probe", two, environ={})
    assert not should_launch("soda", RuntimeConfig(), environ={})  # the default: one process, no launcher
    assert should_launch("ldae", RuntimeConfig(nnodes=2), environ={})  # one worker on each of two nodes
    assert workers_per_node(RuntimeConfig(nproc_per_node=0, device="cpu")) == 1
    assert set(DDP_STAGES) == {"soda", "ul_stage1", "ul_stage2", "ldae", "feature_net"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_repo(root: Path, runtime: dict) -> Path:
    params = {**TINY, "runtime": {**TINY["runtime"], **runtime}}
    return tiny_dvc_repo(root, ("prepare", "feature_net"), params, sh, message="tiny")


def metrics(root: Path) -> dict:
    m = json.loads((root / "metrics/feature_net.json").read_text())
    return {k: v for k, v in m.items() if k not in TIMING}


@pytest.mark.slow
@pytest.mark.scale
def test_dvc_repro_with_two_launched_workers_matches_one_worker(tmp_path):
    one = tiny_repo(tmp_path / "one", {})
    two = tiny_repo(tmp_path / "two", {"nproc_per_node": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"})
    sh("dvc", "repro", cwd=one)
    out = sh("dvc", "repro", cwd=two)
    assert "launching 2 worker(s)" in out.stderr + out.stdout
    a, b = metrics(one), metrics(two)
    assert a.keys() == b.keys()
    assert a["val_accuracy"] == b["val_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
    assert a["train_accuracy"] == b["train_accuracy"] and a["steps"] == b["steps"] == 12
    # the loss is an all-reduced mean over 2 ranks in the second: equal up to float summation order
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.scale
def test_two_local_nodes_of_one_worker_each_match_one_worker(tmp_path):
    one = tiny_repo(tmp_path / "one", {})
    sh("dvc", "repro", cwd=one)
    nodes = tiny_repo(tmp_path / "nodes", {"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}", "rdzv_id": "t"})
    sh("dvc", "repro", "prepare", cwd=nodes)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([str(BIN / "diffrep"), "stage", "feature_net"], cwd=nodes, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    a, b = metrics(one), metrics(nodes)
    assert (a["val_accuracy"], a["test_accuracy"]) == (b["val_accuracy"], b["test_accuracy"])
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
