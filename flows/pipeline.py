"""The DVC pipeline as a Prefect flow: DVC decides what runs, Prefect runs it and watches it.

Each stage of `dvc.yaml` becomes one task, in DAG order, that calls
`dvc repro --single-item STAGE`; DVC's cache decides whether the stage really
runs ("ran") or is up to date ("cached"). The flow adds what DVC lacks:
retries, per-stage timeouts, every output line in the Prefect logs, a table
artifact of each stage's metrics, a summary artifact, at the end the report
(reports/report.md) and a listing of the sample grids the stages wrote, and the
flow-run id in every lineage block (via DIFFREP_FLOW_RUN_ID).

Optional params.yaml section (schema: PipelineConfig in diffrep.config; not part of the stage params):
    pipeline:
      retries: 0            # extra attempts per stage after a failure
      retry_delay_s: 0      # seconds between attempts
      timeout_s:            # per-stage wall-clock limit; the stage's process group is killed
        ul_stage1: 3600

    python -m flows.pipeline [--stages prepare soda] [--force] [--root .]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any, Iterable

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from diffrep.audit import dvc_executable, dvc_paths, flatten
from diffrep.config import PipelineConfig, load_config

REPORT = "reports/report.md"  # the `report` stage's page, published whole as a markdown artifact
GRID_GLOBS = ("results/*/*.png", "models/*/*.png")  # sample/reconstruction grids the stages write

# DVC's words for "nothing computed": up to date, or outputs restored from its run cache
_SKIPPED = re.compile(r"Stage '(?P<stage>[^']+)' (didn't change, skipping|is cached - skipping run)")
_TAIL = 20  # stderr lines quoted in a failure: where a failed data validation prints its expectations


class StageFailed(RuntimeError):
    """`dvc repro` of one stage failed or timed out; the message quotes the end of its stderr."""


# ---------------------------------------------------------------- the DAG
def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def stage_order(dvc_stages: dict[str, Any], only: list[str] | None = None) -> list[str]:
    """Stages in DAG order (dvc.yaml order among independent ones); `only` keeps a subset, still in DAG order.

    A stage depends on another when one of its deps is, lies under, or contains one of the other's outs.
    """
    for name, d in dvc_stages.items():
        if "foreach" in d or "matrix" in d:
            raise ValueError(f"dvc.yaml stage {name!r} uses foreach/matrix, which the flow does not expand; "
                             "write its stages out explicitly")
    outs = {s: [p for kind in ("outs", "metrics", "plots") for p in dvc_paths(d.get(kind))] for s, d in dvc_stages.items()}
    needs = {
        s: {u for u in dvc_stages if u != s and any(_overlaps(dep, o) for dep in dvc_paths(d.get("deps")) for o in outs[u])}
        for s, d in dvc_stages.items()
    }
    order: list[str] = []
    while len(order) < len(dvc_stages):
        ready = [s for s in dvc_stages if s not in order and needs[s] <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml has a cycle among stages: {sorted(set(dvc_stages) - set(order))}")
        order.append(ready[0])
    if only is None:
        return order
    unknown = [s for s in only if s not in dvc_stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has: {', '.join(order)}")
    return [s for s in order if s in only]


def metrics_files(stage_def: dict[str, Any]) -> list[str]:
    return [p for p in dvc_paths(stage_def.get("metrics")) if p.endswith(".json")]


# ---------------------------------------------------------------- options from params.yaml
def pipeline_options(params_file: Path, stages: list[str]) -> PipelineConfig:
    """The `pipeline:` section of params.yaml (defaults without the file), checked before anything runs."""
    sec = load_config(params_file).pipeline if params_file.is_file() else PipelineConfig()
    for name, s in sec.timeout_s.items():
        if name not in stages:
            raise ValueError(f"{params_file.name}: pipeline.timeout_s names unknown stage {name!r}; "
                             f"dvc.yaml has: {', '.join(stages)}")
        if s <= 0:
            raise ValueError(f"{params_file.name}: pipeline.timeout_s.{name} must be > 0 seconds, got {s!r}")
    return sec


# ---------------------------------------------------------------- one stage
def _pump(stream: IO[bytes], log: Any, lines: deque[str], prefix: str) -> None:
    """Forward each line to the logger; of a \\r-rewritten line (a progress bar) keep what a terminal shows last."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()
        if line:
            lines.append(line)
            log.info("%s%s", prefix, line)
    stream.close()


def _flat_scalars(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows {metric: dotted key, value} of the scalar leaves (lists and the like are left out)."""
    return [{"metric": k, "value": v} for k, v in flatten(d).items()
            if v is None or isinstance(v, (bool, int, float, str))]


def artifact_key(stage: str, metrics_file: Path) -> str:
    """Prefect keys allow lowercase letters, digits and dashes: ul_stage1 -> ul-stage1-metrics."""
    name = stage if metrics_file.stem == stage else f"{stage}-{metrics_file.stem}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + "-metrics"


def publish_metrics(stage: str, metrics_file: Path, status: str) -> None:
    """A table artifact of the stage's scalar metrics; the lineage block only lends its commit to the description."""
    metrics = json.loads(metrics_file.read_text())
    lineage = metrics.pop("lineage", None) or {}
    git = lineage.get("git") or {}
    commit = (git.get("commit") or "no commit")[:12] + (" (dirty)" if git.get("dirty") else "")
    create_table_artifact(
        table=_flat_scalars(metrics),
        key=artifact_key(stage, metrics_file),
        description=f"`{metrics_file.name}` of stage **{stage}** ({status}); git {commit}",
    )


def repro_status(name: str, stdout_lines: Iterable[str]) -> str:
    """"cached" when DVC skipped the stage or restored it from its run cache, else "ran"."""
    lines = list(stdout_lines)
    ran = any(line.startswith(f"Running stage '{name}'") for line in lines)
    skipped = any((m := _SKIPPED.search(line)) and m["stage"] == name for line in lines)
    return "cached" if skipped and not ran else "ran"


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_streamed(cmd: list[str], cwd: Path, env: dict[str, str], log: Any,
                 timeout_s: float | None = None) -> tuple[int | None, deque[str], deque[str]]:
    """Run `cmd`, every output line to `log`: (exit code or None on timeout, last stdout lines, last stderr lines)."""
    # Own process group: a timeout must kill the stage's command, not only dvc.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out: deque[str] = deque(maxlen=200)
    err: deque[str] = deque(maxlen=_TAIL)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, log, out, ""), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, log, err, "[stderr] "), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        rc = None
    finally:
        _kill(proc)  # interrupted (Ctrl-C, cancellation): leave no orphan stage behind
    for t in pumps:
        t.join(timeout=10)
    return rc, out, err


def dvc_env(dvc: str, flow_run_id: str | None = None) -> dict[str, str]:
    """The environment of a dvc child: no analytics, unbuffered output, the stage commands on PATH."""
    # `diffrep stage ...` lives beside dvc: a worker started from the venv's python without
    # activating the venv must still find it.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": str(Path(dvc).parent) + os.pathsep + os.environ.get("PATH", "")}
    if flow_run_id:
        env["DIFFREP_FLOW_RUN_ID"] = flow_run_id  # recorded by diffrep.lineage.lineage_block
    return env


@task(task_run_name="{name}")
def run_stage(
    name: str,
    root: str = ".",
    force: bool = False,
    timeout_s: float | None = None,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """`dvc repro --single-item NAME` with its output streamed to the Prefect log: {stage, status, seconds}."""
    log = get_run_logger()
    root_p = Path(root).resolve()
    cmd = [dvc_executable(), "repro", "--single-item", name] + (["--force"] if force else [])
    env = dvc_env(cmd[0], flow_run_id)
    log.info("$ dvc %s", " ".join(cmd[1:]))
    t0 = time.monotonic()
    rc, out, err = run_streamed(cmd, root_p, env, log, timeout_s)
    seconds = round(time.monotonic() - t0, 2)
    tail = "\n".join(err)
    if rc is None:
        raise StageFailed(f"stage {name!r} timed out after {timeout_s:g} s (params.yaml pipeline.timeout_s.{name}); "
                          f"last stderr lines:\n{tail}")
    if rc != 0:
        raise StageFailed(f"stage {name!r} failed (dvc repro exit {rc}); last stderr lines:\n{tail}")
    status = repro_status(name, out)
    log.info("stage %s %s in %.2f s", name, status, seconds)
    return {"stage": name, "status": status, "seconds": seconds}


# ---------------------------------------------------------------- end-of-run artifacts
def grid_files(root: Path, dvc_stages: dict[str, Any], order: list[str]) -> list[Path]:
    """The PNG grids (GRID_GLOBS) that lie inside the outs of the stages this run covered."""
    outs = [o for s in order for o in dvc_paths(dvc_stages[s].get("outs"))]
    found = {p for g in GRID_GLOBS for p in root.glob(g) if p.is_file()}
    rel = {p: p.relative_to(root).as_posix() for p in found}
    return sorted((p for p in found if any(_overlaps(rel[p], o) for o in outs)), key=lambda p: rel[p])


def grids_markdown(root: Path, files: list[Path]) -> str:
    """A table of the grids with a file:// link each (artifacts hold text, not images), size and hash prefix."""
    from diffrep.io import file_hash

    lines = ["# Sample grids", "", f"In `{root}` (open the links on that machine, or `dvc pull` them):", "",
             "| grid | bytes | sha256 |", "|---|---|---|"]
    for p in files:
        rel = p.relative_to(root).as_posix()
        lines.append(f"| [{rel}]({p.resolve().as_uri()}) | {p.stat().st_size} | `{file_hash(p)[:12]}` |")
    return "\n".join(lines) + "\n"


def publish_results(root: Path, dvc_stages: dict[str, Any], order: list[str]) -> list[str]:
    """The report and the grid listing as markdown artifacts; returns the keys published.

    Only what this run covered: a `--stages prepare` run must not re-publish a stale report.
    """
    keys = []
    report = root / REPORT
    if "report" in order and report.is_file():
        create_markdown_artifact(report.read_text(), key="diffrep-report",
                                 description=f"`{REPORT}` as written by the report stage")
        keys.append("diffrep-report")
    grids = grid_files(root, dvc_stages, order)
    if grids:
        create_markdown_artifact(grids_markdown(root, grids), key="sample-grids",
                                 description=f"{len(grids)} image grid(s) written by the stages of this run")
        keys.append("sample-grids")
    return keys


# ---------------------------------------------------------------- the flow
def _summary(rows: list[dict[str, Any]], run_id: str | None) -> str:
    lines = [f"# diffrep pipeline (flow run `{run_id}`)", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


@flow(name="diffrep-pipeline")
def pipeline_flow(stages: list[str] | None = None, force: bool = False, root: str = ".") -> list[dict[str, Any]]:
    """Run the dvc.yaml stages (all, or `stages`) in DAG order, one task each; stop at the first failure."""
    log = get_run_logger()
    root_p = Path(root).resolve()
    dvc_file = root_p / "dvc.yaml"
    if not dvc_file.is_file():
        raise FileNotFoundError(f"{dvc_file}: not found; pass root= the DVC project folder")
    dvc_stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages") or {}
    order = stage_order(dvc_stages, stages)
    opts = pipeline_options(root_p / "params.yaml", list(dvc_stages))
    run_id = flow_run.id
    log.info("stages in DAG order: %s", ", ".join(order))
    rows: list[dict[str, Any]] = []
    try:
        for name in order:
            t0 = time.monotonic()
            stage_task = run_stage.with_options(retries=opts.retries, retry_delay_seconds=opts.retry_delay_s)
            try:
                row = stage_task(name, root=str(root_p), force=force, timeout_s=opts.timeout_s.get(name),
                                 flow_run_id=run_id)
            except Exception:
                rows.append({"stage": name, "status": "failed", "seconds": time.monotonic() - t0})
                raise
            rows.append(row)
            for mf in metrics_files(dvc_stages[name]):
                if (root_p / mf).is_file():
                    publish_metrics(name, root_p / mf, row["status"])
        published = publish_results(root_p, dvc_stages, order)
        if published:
            log.info("published artifacts: %s", ", ".join(published))
    finally:
        create_markdown_artifact(_summary(rows, run_id), key="pipeline-summary",
                                 description="stages of this run: ran, cached (DVC up to date) or failed")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=None, help="run only these stages (in DAG order)")
    p.add_argument("--force", action="store_true", help="re-run stages even when DVC says they are up to date")
    p.add_argument("--root", default=".", help="the DVC project folder (default: .)")
    args = p.parse_args(argv)
    try:
        rows = pipeline_flow(stages=args.stages, force=args.force, root=args.root)
    except (StageFailed, ValueError, FileNotFoundError) as e:
        print(f"pipeline failed: {e}", file=sys.stderr)
        return 1
    for r in rows:
        print(f"{r['stage']:<16} {r['status']:<7} {r['seconds']:8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
