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
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from diffrep.config import Config, TrainConfig, to_dict
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

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


@contextmanager
def stage(name: str, cfg: Config, root: Path) -> Iterator[StageContext]:
    """Set up the runtime (device, threads, DDP), seed, start the clock; tear DDP down however the stage ends."""
    dist = setup_distributed(cfg.runtime.device)
    try:
        runtime = resolve_runtime(cfg.runtime)
        torch.manual_seed(cfg.seed)
        yield StageContext(name, cfg, Path(root), runtime, dist, now_utc(), time.perf_counter())
    finally:
        teardown_distributed()


def fingerprint(ctx: StageContext, params: dict[str, Any], inputs: Iterable[Path]) -> str:
    """Hash of everything that determines the trained weights (params, seed, input contents)."""
    return json_hash({"stage": ctx.name, "params": params, "seed": ctx.cfg.seed,
                      "inputs": {str(p): path_hash(p) for p in inputs}})


def train(ctx: StageContext, model: torch.nn.Module, train_cfg: TrainConfig, data: dict[str, torch.Tensor], *,
          params: dict[str, Any], inputs: Iterable[Path], sample_fn: Callable | None = None,
          progress: bool = True):
    """Run the one training engine with this stage's checkpoint folder, logs and loss curve."""
    from diffrep.nn import set_attention_backend
    from diffrep.train import Trainer

    set_attention_backend(model, ctx.runtime.attention)  # runtime.attention reaches every attention layer
    fp = fingerprint(ctx, params, inputs)
    ckpt_dir = ctx.path(f".cache/checkpoints/{ctx.name}-{fp[:16]}")
    trainer = Trainer(
        model, train_cfg, ctx.runtime, data, seed=ctx.cfg.seed, ckpt_dir=ckpt_dir, fingerprint=fp,
        run_name=ctx.name, log_dir=ctx.path(f"runs/{ctx.name}"),
        loss_curve_path=ctx.path(f"metrics/{ctx.name}_loss.tsv"), sample_fn=sample_fn, progress=progress,
    )
    result = trainer.fit()
    return result, ckpt_dir


def discard_checkpoints(ckpt_dir: Path) -> None:
    """Called once the stage's outputs are safely written: the resume state is no longer needed."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def finish(ctx: StageContext, metrics: dict[str, Any], *, params: dict[str, Any], inputs: Iterable[Path],
           outputs: Iterable[Path]) -> dict[str, Any]:
    """Write metrics/<stage>.json with the lineage block, and print a one-screen summary."""
    metrics = dict(metrics)
    metrics["wall_s"] = round(ctx.elapsed(), 1)
    metrics["lineage"] = lineage_block(ctx.name, params, inputs, outputs, seed=ctx.cfg.seed,
                                       device=str(ctx.runtime.device), started=ctx.started, root=ctx.root)
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
    """finish() for a trained stage (outputs: its model folder and loss curve), then drop the resume state."""
    out = finish(ctx, metrics, params=params, inputs=inputs,
                 outputs=[ctx.path(out_dir), ctx.path(f"metrics/{ctx.name}_loss.tsv")])
    discard_checkpoints(ckpt_dir)
    return out


def section_params(cfg: Config, *sections: str) -> dict[str, Any]:
    """The params a stage depends on, as recorded in its lineage block (same keys as dvc.yaml)."""
    out: dict[str, Any] = {"seed": cfg.seed}
    for s in sections:
        out[s] = to_dict(cfg.section(s))
    return out
