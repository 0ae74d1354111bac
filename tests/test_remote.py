"""Sharing through a DVC remote: push to a local-directory remote, clone fresh, pull, and audit there.

The way a reviewer checks a reported number on another machine. The project is test_audit's two-stage
fake pipeline (real `dvc repro`, real lineage blocks), so this stays fast.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_audit import DVC_YAML, PARAMS, STAGE_PY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(*cmd: str, cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"))
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k, v in {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
                 "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():
        monkeypatch.setenv(k, v)


def test_push_clone_pull_then_repro_is_a_noop_and_the_audit_verifies(tmp_path, env):
    # the author: run the pipeline, commit code + dvc.lock + metrics, push the outputs
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "stage.py").write_text(STAGE_PY)
    (origin / "raw.txt").write_text("the raw source data\n")
    (origin / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (origin / "params.yaml").write_text(PARAMS)
    sh("git", "init", "-q", ".", cwd=origin)
    sh("dvc", "init", "-q", cwd=origin)
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=origin)
    sh("dvc", "repro", cwd=origin)
    sh("git", "add", "-A", cwd=origin)
    sh("git", "commit", "-qm", "pipeline run", cwd=origin)
    sh("dvc", "push", cwd=origin)
    assert any((tmp_path / "remote").rglob("*.dir"))  # folder outputs travel with their listing

    # the reviewer: a fresh clone has code, dvc.lock and metrics, but no outputs until `dvc pull`
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert not (clone / "data/a").exists() and not (clone / "models/b").exists()
    sh("dvc", "pull", cwd=clone)
    for p in ("data/a/x.txt", "data/b.txt", "models/b/model.pt"):
        assert (clone / p).read_bytes() == (origin / p).read_bytes(), p

    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=clone)
    assert "Running stage" not in sh("dvc", "repro", cwd=clone)  # nothing recomputed
    audit = sh("diffrep", "lineage", "metrics/b.json", "--key", "fd", cwd=clone)  # exit 0 or sh fails
    assert "(fd = 9.25)" in audit and "chain intact: 2 stage(s)" in audit
