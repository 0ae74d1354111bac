"""`make gpu-check`: what a new GPU machine can do for diffrep, in one JSON (bench/results/gpu_check.json).

    python -m bench.gpu_check [--out FILE] [--steps N]

  matmul        the device's measured matmul rate (bf16 on CUDA, fp32 on CPU): the yardstick
  models        every pipeline model (params.yaml), a few Trainer steps in bf16 autocast on CUDA (fp32 on CPU):
                img/s, achieved FLOP/s and its share of the matmul rate
  attention     xformers vs SDPA vs the math reference: max |difference| and time per call (xformers: CUDA only)
  compile       one torch.compile'd training step of the smallest model, against the eager loss
  nccl          a 2-process NCCL all-reduce and DDP step, when 2 GPUs are visible
  presets       peak CUDA memory of one step of each preset model at the preset's batch (CUDA only)
Every part that cannot run here is listed under "skipped" with the reason; on a CPU the whole check
takes well under 2 minutes (tests/test_gpu_check.py runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _attention(dev: torch.device, skipped: dict) -> dict:
    from diffrep.nn.attention import attention, xformers_available

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(8, 4, 256, 64, generator=g, device=dev, dtype=dtype) for _ in range(3))  # (B, H, N, D)
    ref = attention(q, k, v, "math").float()
    backends = ["sdpa"] + (["xformers"] if dev.type == "cuda" and xformers_available() else [])
    if "xformers" not in backends:
        skipped["attention.xformers"] = ("needs CUDA" if dev.type != "cuda" else
                                         "xformers not importable (pip install --no-deps xformers)")
    out = {"dtype": str(dtype).removeprefix("torch."), "shape_bhnd": [8, 4, 256, 64]}
    for name in ["math", *backends]:
        attention(q, k, v, name)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(10):
            y = attention(q, k, v, name)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out[name] = {"ms_per_call": round((time.perf_counter() - t) * 100, 3),
                     "max_abs_diff_vs_math": float((y.float() - ref).abs().max())}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    out["agree"] = all(out[b]["max_abs_diff_vs_math"] <= tol for b in backends)
    out["tolerance"] = tol
    return out


def _models(cfg, rt, steps: int, matmul_gflops: float) -> list[dict]:
    from dataclasses import asdict

    from bench.models import MODELS, build, image_shape
    from bench.train import bench_train

    shape = image_shape(cfg, ROOT)
    return [asdict(bench_train(build(name, cfg, shape), rt, steps=steps, warmup=1, matmul_gflops=matmul_gflops))
            for name in MODELS]


def _compile(cfg, rt) -> dict:
    from bench.models import build, image_shape
    from bench.train import make_trainer

    spec = build("ul_stage2", cfg, image_shape(cfg, ROOT))  # the smallest graph: compiles fastest
    losses = {}
    for compiled in (False, True):
        r = dataclasses.replace(rt, compile=compiled)
        torch.manual_seed(0)
        spec = build("ul_stage2", cfg, image_shape(cfg, ROOT))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(spec, r, Path(tmp))
            trainer.model.train()
            t = time.perf_counter()
            losses[compiled] = (trainer.train_step(0)[0][0], time.perf_counter() - t)
    (eager, _), (comp, secs) = losses[False], losses[True]
    return {"model": "ul_stage2", "eager_loss": eager, "compiled_loss": comp, "first_step_s": round(secs, 2),
            "rel_diff": abs(comp - eager) / max(abs(eager), 1e-12), "agree": abs(comp - eager) <= 1e-2 * abs(eager)}


def _nccl_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    x = torch.full((1 << 20,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    ok = bool((x == 3).all())
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"all_reduce_ok": ok}))


def _nccl() -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_nccl_worker, args=(port, tmp), nprocs=2, join=True, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    return {"world_size": 2, "all_reduce_ok": all(r["all_reduce_ok"] for r in ranks)}


def _presets(rt) -> list[dict]:
    from bench.models import build
    from bench.presets import MODELS, PRESETS, preset_config, shape_of, train_cfg
    from bench.train import make_trainer

    rows = []
    for path in PRESETS:
        cfg = preset_config(path)
        for name in MODELS:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(rt.device)
            spec = build(name, cfg, shape_of(cfg))
            with tempfile.TemporaryDirectory() as tmp:
                trainer = make_trainer(spec, rt, Path(tmp))
                trainer.model.train()
                trainer.train_step(0)
            rows.append({"preset": path.stem, "model": name, "batch_size": train_cfg(cfg, name).batch_size,
                         "peak_cuda_gib": round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)})
            del trainer, spec
    return rows


def run(out: Path, steps: int) -> dict:
    from bench.machine import matmul_rate
    from diffrep.config import RuntimeConfig, load_config
    from diffrep.runtime import resolve_runtime

    t0 = time.perf_counter()
    cfg = load_config(ROOT / "params.yaml")
    cuda = torch.cuda.is_available()
    rt = resolve_runtime(RuntimeConfig(device="cuda" if cuda else "cpu", precision="auto"))
    dev, skipped, res = rt.device, {}, {"device": str(rt.device), "torch": torch.__version__}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(dev)
    mm = matmul_rate(dev, torch.bfloat16 if cuda else torch.float32, sizes=(4096, 8192) if cuda else (1024,), reps=2)
    res["matmul"] = {"dtype": mm.dtype, "gflops": mm.gflops}
    res["models"] = _models(cfg, rt, steps, mm.gflops)
    res["attention"] = _attention(dev, skipped)
    if cuda:
        res["compile"] = _compile(cfg, rt)
    else:
        skipped["compile"] = "CPU: a torch.compile step costs minutes on 2 cores; run on the GPU machine"
    if cuda and torch.cuda.device_count() >= 2:
        res["nccl"] = _nccl()
    else:
        skipped["nccl"] = f"needs 2 CUDA devices, found {torch.cuda.device_count() if cuda else 0}"
    if cuda:
        res["presets"] = _presets(rt)
    else:
        skipped["presets"] = "peak memory at the presets' batch sizes needs CUDA"
    res["skipped"], res["wall_s"] = skipped, round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    from diffrep.io import write_json

    write_json(out, res)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_check.json")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    a = p.parse_args(argv)
    res = run(a.out, a.steps)
    print(json.dumps({k: res[k] for k in ("device", "matmul", "skipped", "wall_s")}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
