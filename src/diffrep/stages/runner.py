"""What every training stage shares, so each stage file only says what is its own.

    with stage("soda", cfg, root) as ctx:            # runtime, DDP, seeds, clock; DDP torn down after
        result, ckpt_dir = train(ctx, model, section.train, data, params=..., inputs=[...])
        if ctx.is_main:                              # evaluate, save_model(...), then
            finish_training(ctx, training_metrics(result) | own_metrics, ...)

Resume checkpoints live under `.cache/checkpoints/<stage>-<fingerprint>/`,
outside the stage outputs (DVC deletes those before re-running a stage) and
keyed by a hash of the stage's params and inputs, so a changed param starts
fresh instead of resuming someone else's run. TensorBoard logs go to
`runs/<stage>/`, the loss curve to `metrics/<stage>_loss.tsv` (dvc plots).
A resumed (or refused) checkpoint is recorded under `lineage.resume`.

One run per stage and repository at a time: `stage()` (and `@guarded` for
stages that do not use it) holds `.cache/locks/<stage>.lock`, an flock that
names its holder (pid, host, start); a second run refuses, naming it. The OS
drops the lock of a process that died, so a stale lock file is taken over.
SIGTERM/SIGINT end the stage cleanly with 128 + signum (diffrep/interrupt.py).
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from diffrep.config import Config, TrainConfig, image_size_problems, to_dict
from diffrep.interrupt import exit_on_signals
from diffrep.io import json_hash, path_hash, write_json
from diffrep.lineage import lineage_block, now_utc
from diffrep.runtime import Runtime, resolve_runtime
from diffrep.train.distributed import DistInfo, setup_distributed, teardown_distributed


@dataclass
class StageContext:
    name: str
    cfg: Config
    root: Path
    runtime: Runtime
    dist: DistInfo
    started: str
    t0: float
    resume: dict[str, Any] | None = None  # set by train(): what happened to the resume checkpoints
    online: dict[str, Any] | None = None  # set by train() with train.eval_every: the val kNN summary and selection
    online_curve: Path | None = None  # set by online_eval(): a representation stage writes its curve, on or off

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class StageLocked(RuntimeError):
    """Another run of the same stage holds its lock in this repository."""


@contextmanager
def stage_lock(root: Path, name: str) -> Iterator[Path]:
    """Hold `.cache/locks/<name>.lock` (flock, released by the OS if we die); refuse if someone else holds it."""
    path = Path(root) / ".cache" / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "(holder not recorded yet)"
            raise StageLocked(f"stage {name!r} is already running in {Path(root).resolve()}: {path} is held by "
                              f"{holder}; wait for that run to finish (two writers would corrupt each other's "
                              "outputs)") from None
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if stale:  # the previous holder died without releasing (its flock went with it)
            print(f"[{name}] taking over the lock {path} left by a run that is no longer running: {stale}",
                  file=sys.stderr, flush=True)
        me = json.dumps({"pid": os.getpid(), "host": platform.node(), "started": now_utc(), "argv": sys.argv[:4]})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty lock file is a free lock
    finally:
        os.close(fd)


def guarded(name: str) -> Callable:
    """Decorator for a stage's run(cfg, root) that does not use stage(): the lock and clean signal exits."""

    def deco(run: Callable) -> Callable:
        @functools.wraps(run)
        def wrapper(cfg: Config, root: Path, *args, **kwargs):
            with stage_lock(Path(root), name), exit_on_signals():
                return run(cfg, root, *args, **kwargs)

        return wrapper

    return deco


@contextmanager
def stage(name: str, cfg: Config, root: Path) -> Iterator[StageContext]:
    """Lock the stage, check the config fits its networks, set up the runtime (device, threads, DDP), seed,
    start the clock; tear DDP down and release the lock however the stage ends."""
    if problems := image_size_problems(cfg, name):
        raise ValueError(f"stage {name}: " + "; ".join(problems))
    dist = setup_distributed(cfg.runtime.device)
    try:
        with ExitStack() as guards:
            if dist.is_main:  # one lock per run, not per DDP process
                guards.enter_context(stage_lock(Path(root), name))
            guards.enter_context(exit_on_signals())
            runtime = resolve_runtime(cfg.runtime, name)  # precision: auto looks the stage up (runtime.CPU_BF16)
            torch.manual_seed(cfg.seed)
            yield StageContext(name, cfg, Path(root), runtime, dist, now_utc(), time.perf_counter())
    finally:
        teardown_distributed()


def fingerprint(ctx: StageContext, params: dict[str, Any], inputs: Iterable[Path]) -> str:
    """Hash of everything that determines the trained weights (params, seed, input contents, the resolved
    training precision: `precision: auto` differs by CPU, so a checkpoint never resumes in another one)."""
    return json_hash({"stage": ctx.name, "params": params, "seed": ctx.cfg.seed,
                      "inputs": {str(p): path_hash(p) for p in inputs},
                      "autocast": str(ctx.runtime.autocast_dtype)})


def train(ctx: StageContext, model: torch.nn.Module, train_cfg: TrainConfig, data: dict[str, torch.Tensor], *,
          params: dict[str, Any], inputs: Iterable[Path], sample_fn: Callable | None = None,
          progress: bool = True, online=None):
    """Run the one training engine with this stage's checkpoint folder, logs and loss curve.

    online: an OnlineEval (see online_eval()) for a stage that learns a representation; required when
    train.eval_every > 0, so that a stage without a representation refuses the key instead of ignoring it.
    """
    from diffrep.nn import set_attention_backend
    from diffrep.train import Trainer

    if train_cfg.eval_every and online is None:
        raise ValueError(f"stage {ctx.name}: train.eval_every={train_cfg.eval_every}, but this stage learns no "
                         "representation to measure; set its train.eval_every to 0 (and train.select to last)")

    set_attention_backend(model, ctx.runtime.attention)  # runtime.attention reaches every attention layer
    fp = fingerprint(ctx, params, inputs)
    ckpt_dir = ctx.path(f".cache/checkpoints/{ctx.name}-{fp[:16]}")
    trainer = Trainer(
        model, train_cfg, ctx.runtime, data, seed=ctx.cfg.seed, ckpt_dir=ckpt_dir, fingerprint=fp,
        run_name=ctx.name, log_dir=ctx.path(f"runs/{ctx.name}"),
        loss_curve_path=ctx.path(f"metrics/{ctx.name}_loss.tsv"), sample_fn=sample_fn, progress=progress,
        online=online,
    )
    result = trainer.fit()
    ctx.resume = resume_record(ctx, result, train_cfg.steps)
    if online is not None and ctx.is_main:
        ctx.online = online.finish(result.ema)  # select: best -> the EMA weights of the best val kNN step
        print(f"[{ctx.name}] online val kNN: " + " ".join(f"{int(r[0])}:{r[1]:.3f}" for r in online.rows)
              + f"; select={train_cfg.select} -> step {ctx.online.get('selected_step')}", file=sys.stderr)
    return result, ckpt_dir


ONLINE_PARAMS = ("probe.knn_k", "probe.knn_temperature")  # what the online kNN reads besides the stage's section


def online_curve(name: str) -> Path:
    return Path(f"metrics/{name}_online.tsv")


def online_eval(ctx: StageContext, prep, kind: str, train_cfg: TrainConfig):
    """The online val-kNN evaluator of a representation stage (train/online.py); None when train.eval_every is 0
    (the stage still writes its curve file, header only: it is a declared output in dvc.yaml)."""
    ctx.online_curve = ctx.path(online_curve(ctx.name))
    if not train_cfg.eval_every:
        return None
    from diffrep.eval.features import feature_fn
    from diffrep.eval.probe import Probe
    from diffrep.train.online import OnlineEval

    dev = ctx.runtime.device
    probe = Probe(ctx.cfg.probe, torch.from_numpy(prep.labels("train")), prep.num_classes, ctx.cfg.seed)
    return OnlineEval(lambda m: feature_fn(m, kind, device=dev), probe, prep.image_rows("train"),
                      prep.image_rows("val"), torch.from_numpy(prep.labels("val")), train_cfg,
                      curve_path=ctx.online_curve)


def resume_record(ctx: StageContext, result, steps: int) -> dict[str, Any]:
    """For lineage.resume: the step and checkpoint a run resumed from (paths relative to the root), and refusals."""
    start, root = result.resumed_from_step, str(ctx.root.resolve()) + os.sep
    ckpt = str(Path(result.resumed_from).resolve()).removeprefix(root) if result.resumed_from else None
    note = f"resumed from step {start} of {steps} (checkpoint {ckpt})" if ckpt else f"trained from step 0 of {steps}"
    return {"resumed_from_step": start, "of_steps": steps, "checkpoint": ckpt, "note": note,
            "refused": [r.replace(root, "") for r in result.refused_checkpoints]}


def discard_checkpoints(ckpt_dir: Path) -> None:
    """Called once the stage's outputs are safely written: the resume state is no longer needed."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def finish(ctx: StageContext, metrics: dict[str, Any], *, params: dict[str, Any], inputs: Iterable[Path],
           outputs: Iterable[Path], trained: bool = False) -> dict[str, Any]:
    """Write metrics/<stage>.json with the lineage block, and print a one-screen summary."""
    metrics = dict(metrics)
    metrics["wall_s"] = round(ctx.elapsed(), 1)
    metrics["lineage"] = lineage_block(ctx.name, params, inputs, outputs, seed=ctx.cfg.seed,
                                       device=str(ctx.runtime.device), started=ctx.started, root=ctx.root)
    if ctx.resume is not None:
        metrics["lineage"]["resume"] = ctx.resume
    if trained:  # what the training step ran in (fp32 | bf16) and why: two machines' numbers differ by it
        metrics["lineage"]["precision"] = ctx.runtime.precision_record()
    if ctx.online:
        metrics["lineage"]["selection"] = {k: ctx.online.get(k) for k in ("select", "selected_step", "val_knn_selected")}
    write_json(ctx.path(f"metrics/{ctx.name}.json"), metrics)
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"[{ctx.name}] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items()))
    return metrics


def training_metrics(result, rate_key: str = "images_per_s") -> dict[str, Any]:
    """The engine's own numbers, reported by every trained stage under the same names."""
    return {"final_loss": result.final_loss, "steps": result.steps_done, rate_key: result.images_per_s,
            "train_s": round(result.wall_s, 1), "stopped_early": result.stopped_early}


def finish_training(ctx: StageContext, metrics: dict[str, Any], *, params: dict[str, Any], inputs: Iterable[Path],
                    out_dir: Path, ckpt_dir: Path) -> dict[str, Any]:
    """finish() for a trained stage (outputs: its model folder, loss [and online] curve), then drop the resume state."""
    outputs = [ctx.path(out_dir), ctx.path(f"metrics/{ctx.name}_loss.tsv")]
    if ctx.online:
        metrics = {**metrics, "online": ctx.online}
    if ctx.online_curve is not None:
        if not ctx.online:  # evaluation off: the declared plot file holds the header only
            from diffrep.train.online import write_curve

            write_curve(ctx.online_curve, [])
        outputs.append(ctx.online_curve)
    out = finish(ctx, metrics, params=params, inputs=inputs, outputs=outputs, trained=True)
    discard_checkpoints(ckpt_dir)
    return out


def section_params(cfg: Config, *sections: str) -> dict[str, Any]:
    """The params a stage depends on, as recorded in its lineage block (same keys as dvc.yaml)."""
    out: dict[str, Any] = {"seed": cfg.seed}
    for s in sections:
        v = cfg.section(s)
        out[s] = to_dict(v) if hasattr(v, "model_dump") else list(v) if isinstance(v, tuple) else v
    return out
