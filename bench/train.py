"""Training throughput, FLOPs per step and a profile, through the pipeline's own Trainer step.

Each step is `Trainer.train_step`: batch gather from the data dict, BatchRNG, autocast,
model.forward(batch, rng), backward, grad clipping, the NaN guard's one sync,
AdamW, LR schedule and EMA update - everything a `dvc repro` step pays except
logging and checkpoints (which the stages do once per log_every / ckpt_every).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from bench.machine import sync
from bench.models import ModelSpec
from diffrep.runtime import Runtime


def _raw(formula):
    """torch's exported formulas already take tensors (shape-wrapped): tell the counter not to wrap them again."""
    def f(*args, **kwargs):
        return formula(*args, **kwargs)
    f._get_raw = True
    return f


# torch's counter has no formula for the CPU flash-attention kernels SDPA uses on CPU; the math is the same
CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _raw(sdpa_flop),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(sdpa_backward_flop),
}


@dataclass
class TrainBench:
    model: str
    device: str
    precision: str  # "fp32" or the autocast dtype
    batch_size: int
    item_shape: list[int]
    n_params: int
    warmup_steps: int
    steps: int
    wall_s: float  # the timed steps only
    img_per_s: float
    step_ms_median: float
    step_ms_min: float
    flops_per_step: int  # forward + backward (matmuls, convolutions, attention); elementwise ops are not counted
    mflop_per_image: float
    gflops: float  # achieved: flops_per_step * steps / wall_s
    matmul_gflops: float  # the yardstick measured in this run on the same device and threads
    share_of_matmul: float  # gflops / matmul_gflops
    peak_cuda_mib: float | None = None


def share(gflops: float, matmul_gflops: float) -> float:
    """Achieved FLOP/s as a fraction of the measured matmul rate (0 when the yardstick is missing)."""
    return gflops / matmul_gflops if matmul_gflops > 0 else 0.0


def make_trainer(spec: ModelSpec, runtime: Runtime, ckpt_dir: Path):
    from diffrep.nn import set_attention_backend
    from diffrep.train import Trainer

    set_attention_backend(spec.model, runtime.attention)  # as runner.train does
    return Trainer(spec.model, spec.train_cfg, runtime, spec.data, seed=0, ckpt_dir=ckpt_dir,
                   fingerprint="bench", run_name=spec.name, progress=False)


def count_flops(trainer, step: int = 0) -> int:
    """FLOPs of one forward + backward on the eager model (torch.compile'd graphs bypass the counter)."""
    batch, rng = trainer._batch(step)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        with trainer.rt.autocast():
            loss, _ = trainer.model(batch, rng)
        loss.backward()
    trainer.opt.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def bench_train(spec: ModelSpec, runtime: Runtime, *, steps: int, warmup: int, matmul_gflops: float,
                flops_per_step: int | None = None) -> TrainBench:
    """Time `steps` training steps after `warmup` untimed ones; count FLOPs unless given (e.g. from the CPU run)."""
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as ckpt:  # the Trainer wants one; nothing is written
        trainer = make_trainer(spec, runtime, Path(ckpt))
        trainer.model.train()
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        for i in range(warmup):  # first steps: allocator, thread pool, autotuning, torch.compile
            trainer.train_step(i)
        times = []
        for i in range(warmup, warmup + steps):
            sync(runtime.device)
            t = time.perf_counter()
            trainer.train_step(i)
            sync(runtime.device)
            times.append(time.perf_counter() - t)
        flops = flops_per_step if flops_per_step is not None else count_flops(trainer, warmup + steps)
        peak = torch.cuda.max_memory_allocated(runtime.device) / 2**20 if runtime.device.type == "cuda" else None
    bs, wall = spec.train_cfg.batch_size, sum(times)
    gflops = flops * steps / wall / 1e9
    return TrainBench(
        model=spec.name, device=str(runtime.device),
        precision=str(runtime.autocast_dtype).removeprefix("torch.") if runtime.autocast_dtype else "fp32",
        batch_size=bs, item_shape=list(spec.item_shape), n_params=sum(p.numel() for p in spec.model.parameters()),
        warmup_steps=warmup, steps=steps, wall_s=round(wall, 4), img_per_s=round(bs * steps / wall, 2),
        step_ms_median=round(1e3 * statistics.median(times), 3), step_ms_min=round(1e3 * min(times), 3),
        flops_per_step=flops, mflop_per_image=round(flops / bs / 1e6, 2), gflops=round(gflops, 3),
        matmul_gflops=matmul_gflops, share_of_matmul=round(share(gflops, matmul_gflops), 4),
        peak_cuda_mib=round(peak, 1) if peak is not None else None)


@dataclass
class ProfileResult:
    model: str
    device: str
    steps: int
    table: str  # key_averages by self CPU time, as torch prints it
    top: list[dict]  # the same rows as data: op, calls, self_cpu_ms, share of the profiled self CPU time


def profile_train(spec: ModelSpec, runtime: Runtime, *, steps: int = 3, warmup: int = 1,
                  row_limit: int = 30) -> ProfileResult:
    """torch.profiler over `steps` training steps: which ops the step's time goes to."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as ckpt:
        trainer = make_trainer(spec, runtime, Path(ckpt))
        trainer.model.train()
        for i in range(warmup):
            trainer.train_step(i)
        with profile(activities=acts) as prof:
            for i in range(warmup, warmup + steps):
                trainer.train_step(i)
            sync(runtime.device)
    avgs = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avgs) or 1.0
    rows = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    top = [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
            "share": round(e.self_cpu_time_total / total, 4)} for e in rows[:15]]  # the JSON keeps the head
    table = avgs.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return ProfileResult(spec.name, str(runtime.device), steps, table, top)
