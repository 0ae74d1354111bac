"""Fault injection, the slow cases (subprocesses, a tmpfs, a Prefect server): `make faults` runs them.

The same contract as tests/test_faults.py: every fault is survived exactly or
refused by name, nothing half-written, and the next run correct (docs/faults.md).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_faults import ENV, leftovers

from diffrep.io import load_torch

pytestmark = pytest.mark.faults

# ---------------------------------------------------------------- SIGTERM / SIGINT (subprocesses: slow)
TRAIN_SCRIPT = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from test_faults import Crashy, make_data, tcfg
from conftest import make_cfg
from diffrep.stages import runner
root = Path(sys.argv[1])
with runner.stage("soda", make_cfg(source="digits", image_size=8), root) as ctx:
    torch.manual_seed(0)
    model = Crashy(mark=root / "step", sleep_s=float(sys.argv[2]))
    res, _ = runner.train(ctx, model, tcfg(steps=60, ckpt_every=1000), make_data(), params={}, inputs=[],
                          progress=False)
    torch.save(res.model.state_dict(), root / "final.pt")
"""


def _wait_for(cond, what: str, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    ref = tmp_path_factory.mktemp("ref")
    subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(ref), "0"], env=ENV, check=True, capture_output=True)
    return torch.load(ref / "final.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_training_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path, sig, uninterrupted):
    root = tmp_path / "run"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(root), "0.05"], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (root / "step").is_file() and (root / "step").read_text() >= "7", "step 7")
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig, err
    step = int(err.split(f"stopped by {signal.Signals(sig).name} after step ")[1].split()[0])
    (last,) = root.glob(".cache/checkpoints/soda-*/last.pt")
    assert load_torch(last, verify=True)["step"] == step and not (root / "final.pt").exists()
    assert leftovers(root) == [] and (root / ".cache/locks/soda.lock").read_text() == ""
    again = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(root), "0"], env=ENV, capture_output=True,
                           text=True, check=True)
    assert f"resumed from step {step} of 60 (checkpoint {last})" in again.stderr
    a, b = uninterrupted, torch.load(root / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_prepare_exits_cleanly_and_writes_nothing(tmp_path, sig):
    (tmp_path / "params.yaml").write_text("data: {source: mnist5k, image_size: 16}\n")
    cmd = [sys.executable, "-m", "diffrep.cli", "stage", "prepare", "--root", str(tmp_path),
           "--params", str(tmp_path / "params.yaml")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: proc.poll() is not None or _catches_sigterm(proc.pid), "prepare's signal handler")
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out + err
    assert f"{signal.Signals(sig).name} received: stopping" in err and "Traceback" not in err
    assert not (tmp_path / "data/prepared").exists() and not (tmp_path / "metrics").exists()
    assert leftovers(tmp_path) == [] and (tmp_path / ".cache/locks/prepare.lock").read_text() == ""
    assert subprocess.run(cmd, env=ENV, capture_output=True).returncode == 0  # the next run is correct
    assert (tmp_path / "data/prepared/manifest.json").is_file()


# ---------------------------------------------------------------- a real full disk (tmpfs in a user namespace)
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user namespaces (unshare -rm)")
def test_real_enospc_on_a_tiny_tmpfs_during_prepare(tmp_path):
    (tmp_path / "params.yaml").write_text("data: {source: digits, image_size: 8}\n")
    (tmp_path / "data").mkdir()
    cli = f"{sys.executable} -m diffrep.cli stage prepare --root {tmp_path} --params {tmp_path}/params.yaml"
    script = (f"mount -t tmpfs -o size=48k none {tmp_path}/data && {{ {cli}; echo rc=$?; "
              f"echo left:; ls -A {tmp_path}/data; }}")  # what is on the full disk, seen before it goes away
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True)
    # numpy reports the short write as "OSError: 92032 requested and 49024 written" (no errno)
    assert "could not be written (OSError" in out.stderr and "Traceback" not in out.stderr and "rc=1" in out.stdout
    assert out.stdout.split("left:")[1].split() == []  # no temporary folder or file left on the full disk
    assert not (tmp_path / "metrics").exists()
    assert subprocess.run(cli.split(), env=ENV, capture_output=True).returncode == 0  # room again: it works


# ---------------------------------------------------------------- the Prefect flow
FLAKY_AND_BROKEN = f"""
stages:
  ok:
    cmd: {sys.executable} -c "open('ok.txt', 'w').write('1')"
    outs: [ok.txt]
  flaky:
    cmd: {sys.executable} count.py n_flaky 1
    deps: [ok.txt]
    outs: [f.txt]
  broken:
    cmd: {sys.executable} count.py n_broken 99
    deps: [f.txt]
    outs: [b.txt]
"""
COUNT_PY = """
import pathlib, sys
p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1))
if n < int(sys.argv[2]):
    sys.exit(f"{sys.argv[1]}: attempt {n + 1} fails")
open("f.txt" if "flaky" in sys.argv[1] else "b.txt", "w").write("1")
"""


@pytest.mark.slow
def test_flow_retries_a_flaky_stage_and_fails_naming_a_broken_one(prefect_server, tmp_path):
    from test_flow import make_project, read_artifacts

    from flows.pipeline import StageFailed, pipeline_flow

    root = make_project(tmp_path / "p", FLAKY_AND_BROKEN, "seed: 0\npipeline: {retries: 2, retry_delay_s: 0}\n")
    (root / "count.py").write_text(COUNT_PY)
    state = pipeline_flow(root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed) as e:
        state.result()
    assert "stage 'broken' failed" in str(e.value) and "n_broken: attempt 3 fails" in str(e.value)
    assert (root / "n_flaky").read_text() == "2" and (root / "n_broken").read_text() == "3"  # retries + 1 tries
    assert (root / "ok.txt").is_file() and (root / "f.txt").is_file() and not (root / "b.txt").exists()
    summary = read_artifacts(state.state_details.flow_run_id)["pipeline-summary"].data
    assert "| ok | ran |" in summary and "| flaky | ran |" in summary and "| broken | failed |" in summary
