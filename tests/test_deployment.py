"""prefect.yaml: the `retrain` deployment loads, resolves to the pipeline flow, and deploys to a server."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `flows` lives at the repo root, outside the installed package
PREFECT = str(Path(sys.executable).parent / "prefect")


def retrain() -> dict:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return next(d for d in doc["deployments"] if d["name"] == "retrain")


def test_retrain_entrypoint_schedule_and_parameters_are_valid():
    from prefect.flows import load_flow_from_entrypoint

    dep = retrain()
    path, func = dep["entrypoint"].split(":")
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}", use_placeholder_flow=False)
    assert flow.name == "diffrep-pipeline"
    # names and types fit the flow's signature (an unknown name or a wrong type raises)
    assert flow.validate_parameters(dep["parameters"]) == {"stages": None, "force": False, "root": "."}

    (sched,) = dep["schedules"]
    # the server's own schedule model: what the scheduler will compute the run times with
    from prefect.server.schemas.schedules import CronSchedule

    cron = CronSchedule(cron=sched["cron"], timezone=sched["timezone"])
    (nxt,) = asyncio.run(cron.get_dates(n=1, start=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)))  # a Thursday
    assert (nxt.weekday(), nxt.hour, nxt.minute, str(nxt.tzinfo)) == (0, 3, 0, "UTC")  # Monday 03:00 UTC
    assert sched.get("active", True) is True
    assert dep["work_pool"]["name"] == "diffrep-process"


def prefect_cli(*args: str, cwd: Path, api_url: str) -> str:
    env = dict(os.environ, PREFECT_API_URL=api_url, DIFFREP_ROOT=str(cwd))
    out = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"prefect {' '.join(args)} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_prefect_deploy_registers_retrain_with_its_schedule(prefect_server, tmp_path):
    """The documented commands: create the process pool, `prefect deploy -n retrain` (from a copy of the
    repo's deployment files, so nothing is written into the checkout)."""
    from prefect.client.orchestration import get_client

    proj = tmp_path / "repo"
    shutil.copytree(ROOT / "flows", proj / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", proj)
    prefect_cli("work-pool", "create", "diffrep-process", "--type", "process", cwd=proj, api_url=prefect_server)
    prefect_cli("--no-prompt", "deploy", "-n", "retrain", cwd=proj, api_url=prefect_server)

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("diffrep-pipeline/retrain")

    dep = asyncio.run(read())
    assert dep.entrypoint == "flows/pipeline.py:pipeline_flow"
    assert dep.work_pool_name == "diffrep-process"
    assert dep.parameters == {"force": False, "root": "."}
    (s,) = dep.schedules
    assert (s.schedule.cron, s.schedule.timezone, s.active) == ("0 3 * * 1", "UTC", True)
    # the worker changes into the checkout: DIFFREP_ROOT as set when `prefect deploy` ran (resolved then)
    (step,) = dep.pull_steps
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(proj)
