"""Fault injection: every fault is survived exactly or refused by name (docs/faults.md, first table).

Each case asserts nothing half-written (no temporary file left, the previous
version intact) and that the next run is correct. Cases that start
subprocesses, tmpfs mounts or a Prefect server are marked slow: `make faults`.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_cfg
from test_engine import CPU, TinyMLP, assert_same_weights, make_data

import diffrep.io as dio
from diffrep.config import TrainConfig
from diffrep.io import ArtifactError, file_hash, load_torch, save_torch
from diffrep.stages import runner
from diffrep.train import Trainer
from diffrep.train.checkpoint import FORMAT

pytestmark = pytest.mark.faults  # `make test` leaves out the slow ones: `make faults`
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


class Crashy(TinyMLP):
    """TinyMLP that raises at update `crash_at` (0-based) and can write its step to a file (for signal tests)."""

    def __init__(self, crash_at: int | None = None, mark: Path | None = None, sleep_s: float = 0.0):
        super().__init__(dropout=0.1)
        self.crash_at, self.mark, self.sleep_s = crash_at, mark, sleep_s

    def forward(self, batch, rng):
        if rng.step == self.crash_at:
            raise RuntimeError("injected crash")
        if self.mark is not None:
            self.mark.write_text(str(rng.step))
            time.sleep(self.sleep_s)
        return super().forward(batch, rng)


def tcfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=20, batch_size=8, lr=1e-2, warmup_steps=3, ckpt_every=5, log_every=2,
                                 ema_decay=0.9), **kw})


def train(ckpt_dir: Path, c: TrainConfig | None = None, **model_kw):
    torch.manual_seed(0)
    t = Trainer(Crashy(**model_kw), c or tcfg(), CPU, make_data(), seed=3, ckpt_dir=ckpt_dir, fingerprint="fp",
                run_name="t", progress=False)
    return t.fit()


def leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted 20-step run every resumed run must reproduce bit for bit (one thread, like the tests:
    module fixtures are set up before conftest's per-test one-thread fixture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tmp_path_factory.mktemp("full") / "ckpt")
    finally:
        torch.set_num_threads(before)


def crashed_at_12(tmp_path) -> Path:
    """A run that crashed in update 13: last.pt holds step 10, prev.pt step 5."""
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="injected crash"):
        train(ckpt, crash_at=12)
    assert load_torch(ckpt / "last.pt")["step"] == 10 and load_torch(ckpt / "prev.pt")["step"] == 5
    return ckpt


def zero_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    while not any(data[mid : mid + n]):  # make sure the bytes really change
        mid += n
    data[mid : mid + n] = bytes(n)
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- checkpoint integrity
def test_zeroed_bytes_in_last_checkpoint_are_refused_and_prev_is_used(tmp_path, full, capsys):
    ckpt = crashed_at_12(tmp_path)
    zero_middle(ckpt / "last.pt")
    res = train(ckpt)
    err = capsys.readouterr().err
    assert res.resumed_from_step == 5 and res.resumed_from == str(ckpt / "prev.pt")
    assert f"refused checkpoint {ckpt / 'last.pt'}" in err and "damaged" in res.refused_checkpoints[0] + err
    assert f"resumed from step 5 of 20 (checkpoint {ckpt / 'prev.pt'})" in err
    assert_same_weights(full.model, res.model)
    assert_same_weights(full.ema, res.ema)


def test_both_checkpoints_damaged_start_fresh_and_say_so(tmp_path, full, capsys):
    ckpt = crashed_at_12(tmp_path)
    (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:1000])  # truncated
    zero_middle(ckpt / "prev.pt")
    res = train(ckpt)
    err = capsys.readouterr().err
    assert res.resumed_from_step is None and len(res.refused_checkpoints) == 2
    assert "last.pt: unreadable, truncated or damaged" in err and "training from step 0 of 20" in err
    assert_same_weights(full.model, res.model)


def test_checkpoint_from_an_older_schema_is_refused_with_the_reason(tmp_path, full, capsys):
    ckpt = crashed_at_12(tmp_path)
    old = load_torch(ckpt / "last.pt")
    old.pop(dio.DIGEST_KEY)
    save_torch(ckpt / "last.pt", {**old, "format": "diffrep.train/1"})  # what the previous code wrote
    (ckpt / "prev.pt").unlink()
    res = train(ckpt)
    err = capsys.readouterr().err
    assert f"checkpoint format 'diffrep.train/1', this code reads '{FORMAT}'" in err
    assert res.resumed_from_step is None and (ckpt / "last.pt.refused").is_file()
    assert_same_weights(full.model, res.model)


def test_model_artifact_with_a_flipped_byte_is_refused_by_name(tmp_path):
    from diffrep.config import LdaeConfig
    from diffrep.models.artifact import load_model, save_model
    from diffrep.models.ldae import Ldae

    cfg = LdaeConfig.model_validate({"pca_fit_patches": 100, "vit": {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2}})
    model = Ldae(cfg, (1, 8, 8))
    save_model(tmp_path, model, kind="ldae", section=cfg.model_dump(mode="json"), image_shape=(1, 8, 8))
    load_model(tmp_path, "ldae")  # intact: loads
    f = tmp_path / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.pt: (damaged|unreadable|cannot be loaded)"):
        load_model(tmp_path, "ldae")


def test_feature_net_with_a_flipped_byte_is_refused_by_name(tmp_path):
    from diffrep.config import FeatureNetConfig
    from diffrep.eval.feature_net import KIND, FeatureNet, load_feature_net
    from diffrep.models.artifact import save_model

    cfg = FeatureNetConfig.model_validate({"width": 8})
    save_model(tmp_path, FeatureNet(cfg, (1, 8, 8), 3), kind=KIND, section=cfg.model_dump(mode="json"),
               image_shape=(1, 8, 8), extra={"num_classes": 3})
    load_feature_net(tmp_path)  # intact: loads
    f = tmp_path / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.pt: (damaged|unreadable|cannot be loaded)"):
        load_feature_net(tmp_path)


def test_resume_is_said_on_the_console_and_recorded_in_the_lineage(tmp_path, capsys):
    cfg = make_cfg(source="digits", image_size=8)

    def stage_run(crash_at=None):
        with runner.stage("soda", cfg, tmp_path) as ctx:
            torch.manual_seed(0)
            res, ckpt_dir = runner.train(ctx, Crashy(crash_at=crash_at), tcfg(), make_data(), params={},
                                         inputs=[], progress=False)
            return runner.finish(ctx, runner.training_metrics(res), params={}, inputs=[], outputs=[]), ckpt_dir

    with pytest.raises(RuntimeError, match="injected crash"):
        stage_run(crash_at=7)
    metrics, ckpt_dir = stage_run()
    rel = ckpt_dir.relative_to(tmp_path) / "last.pt"
    assert f"[soda] resumed from step 5 of 20 (checkpoint {ckpt_dir / 'last.pt'})" in capsys.readouterr().err
    saved = json.loads((tmp_path / "metrics/soda.json").read_text())["lineage"]["resume"]
    assert saved == metrics["lineage"]["resume"] == {
        "resumed_from_step": 5, "of_steps": 20, "checkpoint": str(rel), "refused": [],
        "note": f"resumed from step 5 of 20 (checkpoint {rel})"}


# ---------------------------------------------------------------- disk full (ENOSPC) while writing
@contextmanager
def disk_full(monkeypatch, module, attr: str, name: str, on_call: int = 1):
    """Make `module.attr` (atomic_path/atomic_dir) fail with ENOSPC, half-written, on its on_call-th write of `name`."""
    real, calls = getattr(module, attr), []

    @contextmanager
    def failing(path, *a, **kw):
        with real(path, *a, **kw) as tmp:
            yield tmp
            if Path(path).name == name:
                calls.append(path)
                if len(calls) == on_call:
                    target = tmp / "report.md" if tmp.is_dir() else tmp
                    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(module, attr, failing)
    yield calls
    monkeypatch.setattr(module, attr, real)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_hash(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_enospc_writing_prepared_arrays_keeps_the_previous_data(tmp_path, monkeypatch, prepared_digits):
    from diffrep.stages.prepare import run

    shutil.copytree(prepared_digits[0], tmp_path, dirs_exist_ok=True)
    before = _hashes(tmp_path / "data")
    real = os.posix_fallocate

    def fallocate(fd, offset, length):  # the disk fills while the memory-mapped split files get their blocks
        if os.readlink(f"/proc/self/fd/{fd}").endswith("test_images.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(ArtifactError, match="could not be written .*No space left"):
        run(make_cfg(source="digits", image_size=8), tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", real)
    assert _hashes(tmp_path / "data") == before and leftovers(tmp_path) == []
    run(make_cfg(source="digits", image_size=8), tmp_path)  # next run: byte-identical output
    assert _hashes(tmp_path / "data") == before


def test_enospc_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, full):
    ckpt = tmp_path / "ckpt"
    with pytest.MonkeyPatch.context() as mp, disk_full(mp, dio, "atomic_path", "last.pt", on_call=2):
        with pytest.raises(ArtifactError, match="could not be written .*No space left"):
            train(ckpt)
    assert load_torch(ckpt / "last.pt", verify=True)["step"] == 5 and leftovers(tmp_path) == []
    res = train(ckpt)
    assert res.resumed_from_step == 5
    assert_same_weights(full.model, res.model)


def test_enospc_writing_a_model_keeps_the_previous_model(tmp_path, monkeypatch):
    from diffrep.config import LdaeConfig
    from diffrep.models.artifact import load_model, save_model
    from diffrep.models.ldae import Ldae

    cfg = LdaeConfig.model_validate({"pca_fit_patches": 100, "vit": {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2}})
    out = tmp_path / "models" / "ldae"

    def save(seed):
        torch.manual_seed(seed)
        with dio.atomic_dir(out) as tmp:
            save_model(tmp, Ldae(cfg, (1, 8, 8)), kind="ldae", section=cfg.model_dump(mode="json"),
                       image_shape=(1, 8, 8), full_config={"seed": seed})

    save(0)
    before = _hashes(out)
    with disk_full(monkeypatch, dio, "atomic_path", "model.pt"):
        with pytest.raises(ArtifactError, match="could not be written .*No space left"):
            save(1)
    assert _hashes(out) == before and leftovers(tmp_path) == []
    load_model(out, "ldae")
    save(1)
    assert json.loads((out / "config.json").read_text()) == {"seed": 1}


def test_enospc_writing_metrics_keeps_the_previous_metrics(tmp_path, monkeypatch):
    cfg = make_cfg(source="digits", image_size=8)
    with runner.stage("soda", cfg, tmp_path) as ctx:
        runner.finish(ctx, {"acc": 0.5}, params={}, inputs=[], outputs=[])
        before = (tmp_path / "metrics/soda.json").read_text()
        with disk_full(monkeypatch, dio, "atomic_path", "soda.json"):
            with pytest.raises(ArtifactError, match="could not be written .*No space left"):
                runner.finish(ctx, {"acc": 0.75}, params={}, inputs=[], outputs=[])
        assert (tmp_path / "metrics/soda.json").read_text() == before and leftovers(tmp_path) == []
        runner.finish(ctx, {"acc": 0.75}, params={}, inputs=[], outputs=[])
    assert json.loads((tmp_path / "metrics/soda.json").read_text())["acc"] == 0.75


def test_enospc_writing_the_report_keeps_the_previous_report(tmp_path, monkeypatch, prepared_digits):
    from diffrep.stages import report

    shutil.copytree(prepared_digits[0] / "metrics", tmp_path / "metrics")
    cfg = make_cfg(source="digits", image_size=8)
    report.run(cfg, tmp_path)
    before = _hashes(tmp_path / "reports")
    with disk_full(monkeypatch, report, "atomic_dir", "reports"):
        with pytest.raises(ArtifactError, match="could not be written .*No space left"):
            report.run(cfg, tmp_path)
    assert _hashes(tmp_path / "reports") == before and leftovers(tmp_path) == []
    report.run(cfg, tmp_path)
    assert _hashes(tmp_path / "reports") == before


# ---------------------------------------------------------------- killed between writing and renaming
KILL_FILE = """
import os, signal, sys
from diffrep.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("new")
    os.kill(os.getpid(), signal.SIGKILL)
"""
KILL_DIR = """
import os, signal, sys
from diffrep import io
real, n = os.replace, []
def replace(a, b):  # the second rename of the swap never happens
    n.append(1)
    if len(n) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
io.os.replace = replace
with io.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "x.txt").write_text("new")
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_kill_between_temp_write_and_rename(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        dio.write_text(target, "old")
    else:
        with dio.atomic_dir(target) as tmp:
            (tmp / "x.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILL_FILE if kind == "file" else KILL_DIR, str(target)], env=ENV)
    assert proc.returncode == -signal.SIGKILL
    if kind == "file":
        assert target.read_text() == "old" and len(leftovers(tmp_path)) == 1  # the dead writer's temp file
        dio.write_text(target, "next")
        assert target.read_text() == "next"
    else:
        assert not target.exists() and len(leftovers(tmp_path)) == 2  # the new temp folder, the old one moved aside
        with dio.atomic_dir(target) as tmp:  # the next writer puts it back, then swaps in its own
            assert (target / "x.txt").read_text() == "old"
            (tmp / "x.txt").write_text("next")
        assert (target / "x.txt").read_text() == "next"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- two runs of one stage at once
def test_second_run_of_a_stage_refuses_naming_the_holder(tmp_path):
    import platform

    with runner.stage_lock(tmp_path, "soda") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == platform.node()
        with pytest.raises(runner.StageLocked) as e:
            with runner.stage("soda", make_cfg(source="digits", image_size=8), tmp_path):
                pytest.fail("two writers")
        assert f'"pid": {os.getpid()}' in str(e.value) and platform.node() in str(e.value)
        with runner.stage("ldae", make_cfg(source="digits", image_size=8), tmp_path):
            pass  # another stage is not blocked
    assert lock.read_text() == ""  # released


def test_prepare_refuses_while_another_prepare_runs(tmp_path, capsys):
    from diffrep import cli

    (tmp_path / "params.yaml").write_text("data: {source: digits, image_size: 8}\n")
    with runner.stage_lock(tmp_path, "prepare"):
        rc = cli.main(["stage", "prepare", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")])
    assert rc == 1 and "stage 'prepare' is already running" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / ".cache/locks/soda.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead.pid, "host": "here"}))  # its holder died without cleaning up
    with runner.stage_lock(tmp_path, "soda"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f'"pid": {dead.pid}' in capsys.readouterr().err
