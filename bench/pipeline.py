"""`--pipeline`: the whole default pipeline from scratch in a fresh clone, stage by stage.

A `git clone` of the committed HEAD (uncommitted changes are NOT in it) with
its own DVC cache (`dvc cache dir --local`), so nothing is pulled from or
written to the repository's cache. Each stage runs as
`dvc repro --single-item -f STAGE` in DAG order, so every stage gets its own
wall time and peak RSS; their sum is the full from-scratch `dvc repro -f`
(plus one dvc start-up per stage, a few seconds each). Then a plain
`dvc repro` measures the no-op check, and the clone's metrics/ give the
quality reached at the default budget.

Peak RSS comes from wait4() on the dvc process: Linux folds the largest
resident set of any waited-for descendant into it, so it is the largest single
process of the stage (the stage's Python, or dvc itself if that was larger).
The wait happens in a small launcher (bench/peak_rss.py): a child forked
straight from this process would inherit its resident set as a floor.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.quality import read_quality


@dataclass
class StageRun:
    stage: str
    wall_s: float
    peak_rss_mib: float
    returncode: int


@dataclass
class PipelineResult:
    commit: str
    uncommitted_changes: bool  # the working tree had changes the clone (of HEAD) does not have
    clone_s: float
    stages: list[StageRun]
    full_repro_s: float  # sum of the single-item runs: the from-scratch `dvc repro -f`
    noop_repro_s: float | None
    noop_peak_rss_mib: float | None
    ok: bool
    quality: dict = field(default_factory=dict)
    log: str | None = None  # where the stages' output went (kept only with --keep-clone)
    note: str = "stages run one by one (dvc repro --single-item -f) in DAG order in a fresh clone of HEAD"


def dag_order(dvc_yaml: Path) -> list[str]:
    """Stage names in DAG order: the pipeline flow's own ordering, so the two never disagree."""
    from flows.pipeline import stage_order  # lazy: imports Prefect

    return stage_order(yaml.safe_load(dvc_yaml.read_text())["stages"])


def run_measured(cmd: list[str], cwd: Path, env: dict, log) -> tuple[float, float, int]:
    """Run cmd -> (wall seconds, peak RSS MiB of its largest process, return code).

    Through bench/peak_rss.py, so the peak is not floored at this (large) process's own RSS.
    """
    launcher = Path(__file__).with_name("peak_rss.py")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "maxrss"
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, str(launcher), str(out), *cmd], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t
        rss_kib = int(out.read_text()) if out.is_file() else 0
    return wall, rss_kib / 1024, rc


def _env(clone: Path, tmp: Path, dvc: str) -> dict:
    """The flow's dvc environment (no analytics, the venv on PATH), run against the clone's own code and state."""
    from flows.pipeline import dvc_env  # lazy: imports Prefect

    return dvc_env(dvc) | {
        # the editable install points at the working tree's src/; the clone must run its own code
        "PYTHONPATH": str(clone / "src"),
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"), "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def run_pipeline(repo: Path, *, keep: bool = False, progress=print) -> PipelineResult:
    tmp = Path(tempfile.mkdtemp(prefix="diffrep-bench-pipeline-"))
    clone, dvc = tmp / "repo", str(Path(sys.executable).parent / "dvc")
    env = _env(clone, tmp, dvc)
    try:
        t = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
        subprocess.run([dvc, "cache", "dir", "--local", str(tmp / "dvc-cache")], cwd=clone, env=env, check=True,
                       capture_output=True)
        clone_s = time.perf_counter() - t
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        progress(f"pipeline: fresh clone of {commit[:10]} in {tmp} ({clone_s:.1f} s)")
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True).stdout.strip())
        if dirty:
            progress("pipeline: warning: the working tree has uncommitted changes; the clone runs HEAD without them")
        runs: list[StageRun] = []
        with open(tmp / "pipeline.log", "w") as log:
            for stage in dag_order(clone / "dvc.yaml"):
                progress(f"pipeline: dvc repro --single-item -f {stage} ...")
                log.write(f"\n===== {stage}\n")
                log.flush()
                wall, rss, rc = run_measured([dvc, "repro", "--single-item", "-f", stage], clone, env, log)
                runs.append(StageRun(stage, round(wall, 2), round(rss, 1), rc))
                progress(f"pipeline: {stage}: {wall:.1f} s, peak RSS {rss:.0f} MiB, exit {rc}")
                if rc:
                    break
            ok = all(r.returncode == 0 for r in runs)
            noop = noop_rss = None
            if ok:
                log.write("\n===== no-op dvc repro\n")
                log.flush()
                noop, noop_rss, rc = run_measured([dvc, "repro"], clone, env, log)
                ok = rc == 0
                progress(f"pipeline: no-op dvc repro: {noop:.1f} s")
        if not ok:
            tail = (tmp / "pipeline.log").read_text()[-3000:]
            progress(f"pipeline: a stage failed; last output:\n{tail}")
        return PipelineResult(
            commit=commit, uncommitted_changes=dirty, clone_s=round(clone_s, 2), stages=runs, full_repro_s=round(sum(r.wall_s for r in runs), 2),
            noop_repro_s=round(noop, 2) if noop is not None else None,
            noop_peak_rss_mib=round(noop_rss, 1) if noop_rss is not None else None, ok=ok,
            quality=read_quality(clone / "metrics", f"--pipeline: fresh clone of {commit}"), log=str(tmp / "pipeline.log") if keep else None)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
