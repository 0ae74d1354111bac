"""prefect.yaml: the `retrain` (process pool) and `retrain-gpu` (Kubernetes GPU pool) deployments load,
resolve to the pipeline flow and deploy to a server; the GPU pool's job template, the failure
automation and the Dockerfile's install step are checked too (Docker itself is not available here)."""
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


JOB_TEMPLATE = ROOT / "deploy" / "k8s-gpu-job-template.json"
AUTOMATION = ROOT / "deploy" / "automation-retrain-failed.yaml"


def deployment(name: str) -> dict:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return next(d for d in doc["deployments"] if d["name"] == name)


def retrain() -> dict:
    return deployment("retrain")


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


def prefect_cli(*args: str, cwd: Path, api_url: str, **extra_env: str) -> str:
    env = dict(os.environ, PREFECT_API_URL=api_url, DIFFREP_ROOT=str(cwd), **extra_env)
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


# ---------------------------------------------------------------- the GPU deployment (Kubernetes work pool)
def test_retrain_gpu_entrypoint_parameters_and_concurrency():
    from prefect.flows import load_flow_from_entrypoint

    dep = deployment("retrain-gpu")
    path, func = dep["entrypoint"].split(":")
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}", use_placeholder_flow=False)
    assert flow.name == "diffrep-pipeline"
    assert flow.validate_parameters(dep["parameters"]) == {"stages": None, "force": False, "root": "."}
    assert dep["work_pool"]["name"] == "diffrep-gpu"
    # one active run at a time; a second one waits instead of being dropped
    assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # the pod runs in the checkout on the workspace claim, whose code is first on PYTHONPATH
    (step,) = dep["pull"]
    workdir = step["prefect.deployments.steps.set_working_directory"]["directory"]
    jv = dep["work_pool"]["job_variables"]
    assert workdir == "/workspace/diffrep"
    assert jv["env"]["PYTHONPATH"].split(":")[0] == f"{workdir}/src"


def template() -> dict:
    import json

    return json.loads(JOB_TEMPLATE.read_text())


def test_gpu_job_template_is_a_valid_kubernetes_template_that_requests_gpus():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools.validation import validate
    from prefect.utilities.templating import apply_values, find_placeholders
    from prefect.workers.base import BaseJobConfiguration

    t = template()
    validate_base_job_template(t)  # the server's check: every placeholder is a declared variable
    declared = set(t["variables"]["properties"])
    used = {p.name for p in find_placeholders(t["job_configuration"])}
    assert declared == used, f"declared but never used: {declared - used}; used, undeclared: {used - declared}"
    # the keys prefect-kubernetes' KubernetesWorkerJobConfiguration reads
    assert {"job_manifest", "namespace", "env", "command", "name", "labels", "cluster_config",
            "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"} <= set(t["job_configuration"])

    # render it as the worker does: variable defaults, then the deployment's job variables
    jv = deployment("retrain-gpu")["work_pool"]["job_variables"]
    jv = {**jv, "image": "registry.example/diffrep:abc123"}  # prefect deploy fills $DIFFREP_IMAGE
    assert validate(jv, t["variables"], ignore_required=True) == []  # names and types fit the schema
    for bad in ("", "{{ $DIFFREP_IMAGE }}"):  # DIFFREP_IMAGE unset at deploy time: refused, not a pod that cannot pull
        assert validate({**jv, "image": bad}, t["variables"], ignore_required=True), bad
    values = {**BaseJobConfiguration._get_base_config_defaults(t["variables"]["properties"]), **jv}
    job = apply_values(t["job_configuration"], values)["job_manifest"]
    assert (job["apiVersion"], job["kind"], job["metadata"]["namespace"]) == ("batch/v1", "Job", "diffrep")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0  # a failed run is not retried silently
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/diffrep:abc123"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
    assert "cpu" not in c["resources"]["limits"]  # unset variables drop out of the manifest
    assert "nodeSelector" not in pod
    assert c["env"]["PYTHONPATH"].startswith("/workspace/diffrep/src")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts == {"workspace": "/workspace", "dshm": "/dev/shm"}
    assert vols["workspace"]["persistentVolumeClaim"]["claimName"] == "diffrep-workspace"
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert any(tol["key"] == "nvidia.com/gpu" for tol in pod["tolerations"])


# ---------------------------------------------------------------- the failure notification
def automation_data(block_id: str) -> dict:
    text = AUTOMATION.read_text()
    assert "${DIFFREP_NOTIFY_BLOCK_ID}" in text  # the placeholder the docs tell people to replace
    return yaml.safe_load(text.replace("${DIFFREP_NOTIFY_BLOCK_ID}", block_id))


def flow_run_event(state: str, flow: str = "diffrep-pipeline", dep: str = "retrain-gpu"):
    """A flow-run state-change event with the resource and related resources the server gives it
    (prefect.server.models.events.flow_run_state_change_event)."""
    import uuid

    from prefect.server.events.schemas.events import ReceivedEvent

    def res(kind: str, role: str, name: str) -> dict:
        return {"prefect.resource.id": f"prefect.{kind}.{uuid.uuid4()}", "prefect.resource.role": role,
                "prefect.resource.name": name}

    return ReceivedEvent(
        occurred=dt.datetime.now(dt.timezone.utc), event=f"prefect.flow-run.{state}",
        resource={"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}", "prefect.resource.name": "brave-otter",
                  "prefect.state-name": state},
        related=[res("flow", "flow", flow), res("deployment", "deployment", dep),
                 res("work-pool", "work-pool", "diffrep-gpu")],
        id=uuid.uuid4())


def test_failure_automation_parses_into_prefects_model_and_fires_only_on_retrain_failures():
    import uuid

    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.server.events.schemas.automations import AutomationCore as ServerAutomation

    with pytest.raises(ValueError, match="block_document_id"):  # the placeholder left in: rejected, not sent nowhere
        AutomationCore.model_validate(yaml.safe_load(AUTOMATION.read_text()))
    block = str(uuid.uuid4())
    a = AutomationCore.model_validate(automation_data(block))
    assert isinstance(a.trigger, EventTrigger) and a.trigger.posture == Posture.Reactive
    assert a.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    (action,) = a.actions
    assert isinstance(action, SendNotification) and str(action.block_document_id) == block

    # the server's matcher (what the triggers service evaluates) on the events it would receive
    trig = ServerAutomation.model_validate(a.model_dump(mode="json")).trigger
    for state in ("Failed", "Crashed"):
        for dep in ("retrain", "retrain-gpu"):
            assert trig.covers(flow_run_event(state, dep=dep)), (state, dep)
    assert not trig.covers(flow_run_event("Completed"))
    assert not trig.covers(flow_run_event("Cancelled"))
    assert not trig.covers(flow_run_event("Failed", dep="nightly-eval"))
    assert not trig.covers(flow_run_event("Failed", flow="other-flow", dep="retrain"))


# ---------------------------------------------------------------- the Dockerfile installs as CI does
def test_dockerfile_installs_with_the_readme_and_ci_install_step(tmp_path):
    """CI (.ci/run) runs `make test`, which needs `setup`; the Dockerfile runs `make setup`;
    and `make setup` is the README's `pip install -e '.[dev]'` (make's dry run, in a copy without a venv)."""
    import re
    import shlex

    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:.*\bsetup\b", makefile, re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = [m.group(1).strip() for m in re.finditer(r"^RUN\s+(.+?)(?<!\\)$", dockerfile, re.M | re.S)]
    installs = [r for r in runs if "pip install" in r or re.match(r"make\b", r)]
    assert installs == ["make setup"], f"the Dockerfile's install RUN lines: {installs}"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M) and "ARG BASE_IMAGE=python:3.11-slim" in dockerfile

    for f in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path)
    out = subprocess.run(["make", "-n", "setup"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")})
    assert out.returncode == 0, out.stderr
    pip = [shlex.split(ln) for ln in out.stdout.splitlines() if "pip install" in ln and "-e" in ln]
    assert len(pip) == 1 and pip[0][0] == ".venv/bin/python", out.stdout
    readme = (ROOT / "README.md").read_text()
    (step,) = set(re.findall(r"`(pip install -e '\.\[dev\]')`", readme))  # the README's install step
    cmd = pip[0][pip[0].index("pip"):]  # after `.venv/bin/python -m`
    opts = {"--progress-bar": "off", "--quiet": None}  # output-only options
    args = [w for i, w in enumerate(cmd) if w not in opts and not (i and cmd[i - 1] in opts and opts[cmd[i - 1]] == w)]
    assert args == shlex.split(step), out.stdout


class Webhook:
    """An HTTP receiver on 127.0.0.1 that keeps each POSTed JSON body: the notification's destination."""

    def __init__(self):
        import http.server
        import json
        import threading

        got = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout_s: float) -> list:
        import time

        t0 = time.monotonic()
        while len(self.received) < n and time.monotonic() - t0 < timeout_s:
            time.sleep(0.2)
        return self.received


@pytest.mark.slow
def test_gpu_pool_automation_and_retrain_gpu_register_with_the_documented_commands(prefect_server, tmp_path):
    """docs/orchestration.md, "Retraining on GPUs", against a test server: the pool from the shipped
    template with concurrency limit 1, a notification block, the automation, `prefect deploy -n retrain-gpu`;
    then a run of the deployment that fails sends the notification (to a local webhook, not Slack)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.states import Failed, Pending, Running

    proj = tmp_path / "repo"
    shutil.copytree(ROOT / "flows", proj / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "deploy", proj / "deploy")
    shutil.copy(ROOT / "prefect.yaml", proj)
    cli = lambda *a, **env: prefect_cli(*a, cwd=proj, api_url=prefect_server, **env)  # noqa: E731
    cli("work-pool", "create", "diffrep-gpu", "--type", "kubernetes",
        "--base-job-template", "deploy/k8s-gpu-job-template.json")
    cli("work-pool", "set-concurrency-limit", "diffrep-gpu", "1")

    hook = Webhook()
    block_id = CustomWebhookNotificationBlock(
        name="diffrep-alerts", url=hook.url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
    ).save("diffrep-alerts")
    filled = tmp_path / "automation.yaml"
    filled.write_text(AUTOMATION.read_text().replace("${DIFFREP_NOTIFY_BLOCK_ID}", str(block_id)))
    assert "Created automation 'diffrep-retrain-failed'" in cli("automation", "create", "--from-file", str(filled))

    # DIFFREP_IMAGE unset: the image would be empty, which the pool's schema (variable `image`) refuses
    env = {k: v for k, v in os.environ.items() if k != "DIFFREP_IMAGE"}
    refused = subprocess.run([PREFECT, "--no-prompt", "deploy", "-n", "retrain-gpu"], cwd=proj, capture_output=True,
                             text=True, timeout=300, env=dict(env, PREFECT_API_URL=prefect_server))
    assert refused.returncode != 0 and "Validation failed for field 'image'" in refused.stderr, refused.stdout
    cli("--no-prompt", "deploy", "-n", "retrain-gpu", DIFFREP_IMAGE="registry.example/diffrep:abc123")

    async def read():
        async with get_client() as client:
            return (await client.read_work_pool("diffrep-gpu"),
                    await client.read_deployment_by_name("diffrep-pipeline/retrain-gpu"),
                    await client.read_automations_by_name("diffrep-retrain-failed"))

    pool, dep, (auto,) = asyncio.run(read())
    assert (pool.type, pool.concurrency_limit) == ("kubernetes", 1)
    assert pool.base_job_template == template()
    assert dep.entrypoint == "flows/pipeline.py:pipeline_flow" and dep.work_pool_name == "diffrep-gpu"
    assert dep.parameters == {"force": False, "root": "."}
    assert dep.job_variables["image"] == "registry.example/diffrep:abc123"  # resolved at deploy time
    assert dep.job_variables["gpu_count"] == 8 and dep.job_variables["namespace"] == "diffrep"
    assert dep.global_concurrency_limit.limit == 1 and dep.concurrency_options.collision_strategy == "ENQUEUE"
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/workspace/diffrep"}}]
    assert not dep.schedules
    (action,) = auto.actions
    assert (action.type, action.block_document_id) == ("send-notification", block_id)
    assert auto.enabled

    # two runs of the deployment: the second must wait for the first (concurrency_limit 1, ENQUEUE);
    # the first goes Running -> Failed (as the flow does when a stage fails): the server's state-change
    # event trips the trigger and the notification arrives
    async def two_runs():
        async with get_client() as client:
            first = await client.create_flow_run_from_deployment(dep.id)
            second = await client.create_flow_run_from_deployment(dep.id)
            for state in (Pending(), Running()):
                assert (await client.set_flow_run_state(first.id, state)).status.value == "ACCEPT"
            await client.set_flow_run_state(second.id, Pending())
            waiting = (await client.read_flow_run(second.id)).state
            # what a worker polls: the pool's limit hands out no second run while one runs ...
            soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
            offered_busy = await client.get_scheduled_flow_runs_for_work_pool("diffrep-gpu", scheduled_before=soon)
            await client.set_flow_run_state(first.id, Failed(message="stage 'soda' failed (dvc repro exit 1)"))
            # ... and the waiting one once the slot is free
            offered_free = await client.get_scheduled_flow_runs_for_work_pool("diffrep-gpu", scheduled_before=soon)
            return first, second, waiting, offered_busy, offered_free

    run, second, waiting, offered_busy, offered_free = asyncio.run(two_runs())
    assert (waiting.type.value, waiting.name) == ("SCHEDULED", "AwaitingConcurrencySlot")
    assert offered_busy == []
    assert [r.flow_run.id for r in offered_free] == [second.id]
    (note,) = hook.wait(1, timeout_s=30)
    assert note["subject"] == f"diffrep: retrain {run.name} Failed"
    assert f"Flow run {run.name} of deployment retrain-gpu entered Failed." in note["body"]
    assert "stage 'soda' failed (dvc repro exit 1)" in note["body"]
    assert "None" not in note["body"]  # no UI address here (PREFECT_UI_URL unset): no link line, not "None"
