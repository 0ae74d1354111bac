"""The Prefect pipeline flow on fake DVC projects, against one temporary Prefect server."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `flows` lives at the repo root, outside the installed package
pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).parent / "dvc")

# Stage a writes a folder; b reads a file inside it. dvc.yaml lists b first: the order must come from the DAG.
# The lineage block is hand-made (no torch import to pay): the flow's contract is the env var it passes on,
# which diffrep.lineage.lineage_block records as prefect_flow_run_id.
STAGE_PY = '''
import json, os, sys, pathlib
name = sys.argv[1]
print(f"stage {name} says hello")
if name == "a":
    pathlib.Path("data/a").mkdir(parents=True, exist_ok=True)
    pathlib.Path("data/a/x.txt").write_text("3")
    metrics = {"count": 3, "nested": {"acc": 0.5}, "hist": [1, 2]}
else:
    v = int(pathlib.Path("data/a/x.txt").read_text()) + 1
    pathlib.Path("data/b.txt").write_text(str(v))
    metrics = {"fd": v + 0.25}
metrics["lineage"] = {"stage": name, "git": {"commit": "0123456789abcdef", "dirty": True},
                      "prefect_flow_run_id": os.environ.get("DIFFREP_FLOW_RUN_ID")}
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump(metrics, open(f"metrics/{name}.json", "w"))
'''

TWO_STAGES = f"""
stages:
  b:
    cmd: {sys.executable} stage.py b
    deps: [data/a/x.txt]
    outs: [data/b.txt]
    metrics: [metrics/b.json: {{cache: false}}]
  a:
    cmd: {sys.executable} stage.py a
    deps: [stage.py]
    outs: [data/a]
    metrics: [metrics/a.json: {{cache: false}}]
"""

FAIL_PY = "import sys; print('expectation failed: label 11 not in 0..9 (rows 3, 7)', file=sys.stderr); sys.exit(1)"
FAILING = f"""
stages:
  ok:
    cmd: {sys.executable} -c "open('ok.txt', 'w').write('1')"
    outs: [ok.txt]
  validate:
    cmd: {sys.executable} fail.py
    deps: [ok.txt]
    outs: [valid.txt]
  after:
    cmd: {sys.executable} -c "open('after.txt', 'w').write('1')"
    deps: [valid.txt]
    outs: [after.txt]
"""

# Fails on its first attempt (counter kept outside DVC's outs), then sleeps past its timeout if asked to.
FLAKY = f"""
stages:
  flaky:
    cmd: {sys.executable} -c "import pathlib; p = pathlib.Path('n'); n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); assert n > 0, 'first try fails'; open('f.txt', 'w').write('1')"
    outs: [f.txt]
  slow:
    cmd: echo $$ > slow.pid && exec sleep 60
    deps: [f.txt]
    outs: [s.txt]
"""


def make_project(root: Path, dvc_yaml: str, params: str = "seed: 0\n") -> Path:
    root.mkdir(parents=True)
    (root / "stage.py").write_text(STAGE_PY)
    (root / "dvc.yaml").write_text(textwrap.dedent(dvc_yaml))
    (root / "params.yaml").write_text(params)
    for cmd in (["git", "init", "-q", "."], [DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def read_artifacts(flow_run_id):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def go():
        async with get_client() as client:
            flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            return await client.read_artifacts(artifact_filter=flt)

    return {a.key: a for a in asyncio.run(go())}


def test_stage_order_follows_deps_not_file_order():
    from flows.pipeline import stage_order

    st = {
        "report": {"deps": ["metrics"]},  # a folder that holds other stages' metrics
        "probe": {"deps": ["models/enc"], "metrics": ["metrics/probe.json"]},
        "train": {"deps": ["data/prepared/train.npy"], "outs": ["models/enc"]},
        "prepare": {"outs": ["data/prepared", {"data/validation.json": {"cache": False}}]},
    }
    assert stage_order(st) == ["prepare", "train", "probe", "report"]
    assert stage_order(st, ["report", "train"]) == ["train", "report"]
    with pytest.raises(ValueError, match="unknown stage.*'nope'"):
        stage_order(st, ["nope"])
    with pytest.raises(ValueError, match="cycle"):
        stage_order({"x": {"deps": ["y.txt"], "outs": ["x.txt"]}, "y": {"deps": ["x.txt"], "outs": ["y.txt"]}})


def test_artifact_keys_are_valid_prefect_keys():
    from flows.pipeline import artifact_key

    assert artifact_key("ul_stage1", Path("metrics/ul_stage1.json")) == "ul-stage1-metrics"
    assert artifact_key("Report", Path("metrics/extra_scores.json")) == "report-extra-scores-metrics"


def test_repro_status_reads_dvc_output():
    from flows.pipeline import repro_status

    assert repro_status("a", ["Running stage 'a':", "> python a.py", "Updating lock file 'dvc.lock'"]) == "ran"
    assert repro_status("a", ["Stage 'a' didn't change, skipping", "Data and pipelines are up to date."]) == "cached"
    assert repro_status("a", ["Stage 'a' is cached - skipping run, checking out outputs"]) == "cached"
    assert repro_status("a", ["Stage 'ab' didn't change, skipping"]) == "ran"


def test_pipeline_options_are_checked(tmp_path):
    from diffrep.config import PipelineConfig
    from flows.pipeline import pipeline_options

    p = tmp_path / "params.yaml"
    p.write_text("seed: 0\n")
    assert pipeline_options(p, ["a"]) == PipelineConfig()
    assert pipeline_options(tmp_path / "none.yaml", ["a"]) == PipelineConfig()  # no params file: the defaults
    p.write_text("pipeline: {retries: 2, retry_delay_s: 5, timeout_s: {a: 60}}\n")
    assert pipeline_options(p, ["a"]) == PipelineConfig(retries=2, retry_delay_s=5.0, timeout_s={"a": 60.0})
    for bad, msg in [("{retries: -1}", "retries"), ("{timeout_s: {zz: 1}}", "unknown stage 'zz'"),
                     ("{timeout_s: {a: 0}}", "timeout_s.a"), ("{retry: 1}", "unknown key")]:
        p.write_text(f"pipeline: {bad}\n")
        with pytest.raises(ValueError, match=msg):
            pipeline_options(p, ["a"])


def test_flow_runs_stages_in_dag_order_then_finds_them_cached(prefect_server, tmp_path):
    from flows.pipeline import pipeline_flow

    root = make_project(tmp_path / "p", TWO_STAGES)
    state = pipeline_flow(root=str(root), return_state=True)
    first = state.result()
    assert [(r["stage"], r["status"]) for r in first] == [("a", "ran"), ("b", "ran")]
    run_id = str(state.state_details.flow_run_id)

    # the flow-run id reached the stage's lineage block through DIFFREP_FLOW_RUN_ID
    lineage = json.loads((root / "metrics/b.json").read_text())["lineage"]
    assert lineage["prefect_flow_run_id"] == run_id

    arts = read_artifacts(run_id)
    assert {"a-metrics", "b-metrics", "pipeline-summary"} <= set(arts)
    table = arts["a-metrics"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {r["metric"]: r["value"] for r in rows} == {"count": 3, "nested.acc": 0.5}  # no lineage, no list
    assert "git 0123456789ab (dirty)" in arts["a-metrics"].description
    assert "| a | ran |" in arts["pipeline-summary"].data

    second = pipeline_flow(root=str(root))
    assert [(r["stage"], r["status"]) for r in second] == [("a", "cached"), ("b", "cached")]


def test_failing_stage_fails_the_flow_with_its_stderr(prefect_server, tmp_path):
    from flows.pipeline import StageFailed, pipeline_flow

    root = make_project(tmp_path / "p", FAILING)
    (root / "fail.py").write_text(FAIL_PY)
    state = pipeline_flow(root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed) as exc:
        state.result()
    msg = str(exc.value)
    assert "'validate'" in msg and "expectation failed: label 11 not in 0..9 (rows 3, 7)" in msg
    assert (root / "ok.txt").exists() and not (root / "after.txt").exists()  # stopped at the failure
    summary = read_artifacts(state.state_details.flow_run_id)["pipeline-summary"].data
    assert "| ok | ran |" in summary and "| validate | failed |" in summary and "after" not in summary


def test_retry_then_timeout_kills_the_stage(prefect_server, tmp_path):
    from flows.pipeline import StageFailed, pipeline_flow

    root = make_project(tmp_path / "p", FLAKY, "seed: 0\npipeline: {retries: 1, retry_delay_s: 0}\n")
    assert pipeline_flow(stages=["flaky"], root=str(root))[0]["status"] == "ran"
    assert (root / "n").read_text() == "2"  # failed once, passed on its retry

    (root / "params.yaml").write_text("seed: 0\npipeline: {timeout_s: {slow: 6}}\n")
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match="'slow' timed out after 6 s"):
        pipeline_flow(stages=["slow"], root=str(root))
    assert time.monotonic() - t0 < 40  # not the 60 s the stage would sleep
    pid = int((root / "slow.pid").read_text())
    for _ in range(50):  # the killed orphan is reaped by init shortly after
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out stage (pid {pid}) is still running")


# A model stage that writes a grid beside its weights, and a report stage: the end-of-run artifacts.
GRID_PY = '''
import pathlib, sys
pathlib.Path("models/m").mkdir(parents=True, exist_ok=True)
pathlib.Path("models/m/weights.bin").write_bytes(b"w")
pathlib.Path("models/m/grid.png").write_bytes(b"\\x89PNG fake")
'''
WITH_REPORT = f"""
stages:
  model:
    cmd: {sys.executable} grid.py
    deps: [grid.py]
    outs: [models/m]
  report:
    cmd: {sys.executable} -c "import pathlib; pathlib.Path('reports').mkdir(); pathlib.Path('reports/report.md').write_text('# the report\\\\nfd_featnet 1.5')"
    deps: [models/m]
    outs: [reports: {{cache: false}}]
"""


def test_flow_publishes_the_report_and_the_grids(prefect_server, tmp_path):
    from flows.pipeline import pipeline_flow

    root = make_project(tmp_path / "p", WITH_REPORT)
    (root / "grid.py").write_text(GRID_PY)
    state = pipeline_flow(root=str(root), return_state=True)
    assert [r["status"] for r in state.result()] == ["ran", "ran"]
    arts = read_artifacts(state.state_details.flow_run_id)
    assert "# the report" in arts["diffrep-report"].data and "fd_featnet 1.5" in arts["diffrep-report"].data
    grids = arts["sample-grids"].data
    assert "[models/m/grid.png](file://" in grids and "weights.bin" not in grids

    # a run of the model stage only lists its grid but does not re-publish the (now stale) report
    state = pipeline_flow(stages=["model"], root=str(root), return_state=True)
    assert set(read_artifacts(state.state_details.flow_run_id)) == {"sample-grids", "pipeline-summary"}


def test_real_prepare_validation_failure_names_the_expectation(prefect_server, tmp_path, monkeypatch):
    """The real `prepare` stage of dvc.yaml on an image folder with a corrupt PNG: the flow fails naming
    the stage, the failing expectation and the file (the lines prepare prints on stderr)."""
    import shutil

    import yaml
    from conftest import make_imagefolder

    from flows.pipeline import StageFailed, pipeline_flow

    dag = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dag["stages"] = {"prepare": dag["stages"]["prepare"]}
    params = "seed: 0\ndata: {source: imagefolder, path: data/raw/imgs, image_size: 8, min_rows: 4}\n"
    root = make_project(tmp_path / "p", yaml.safe_dump(dag), params)
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "data/raw", root / "data/raw")
    make_imagefolder(root / "data/raw/imgs", {"cats": 5, "dogs": 5})
    (root / "data/raw/imgs/dogs/broken.png").write_bytes(b"garbage")
    # no venv on PATH: the flow must find `diffrep` beside dvc itself
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    state = pipeline_flow(root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed) as exc:
        state.result()
    msg = str(exc.value)
    assert "stage 'prepare' failed" in msg
    assert "expectation 'image readable' failed on 1 image: dogs/broken.png" in msg
    assert not (root / "data/prepared").exists()
