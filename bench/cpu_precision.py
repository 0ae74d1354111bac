"""fp32 against bf16 autocast on this CPU, per pipeline model: does bf16 pay? (issue 22 point 7)

    python -m bench.cpu_precision [--models soda,ldae] [--blocks 20] [--steps 2] [--out FILE]

For each trained model of params.yaml (bench.models.TRAINED: built as its stage builds it, with
synthetic data of the real shape) two Trainers are made from identically seeded models, one fp32
and one with bf16 autocast, and their `Trainer.train_step` is timed alternately in blocks
(A B, B A, A B, ...) in this one process: whatever else the machine runs slows both arms alike, so
the per-block ratio bf16/fp32 is fair even under contention. Reported per model, on the wall clock
and on this process's CPU time (run it with --threads 1 on a shared machine: then CPU time is the
step's work, not its wait for a core): the median rate of each arm, the median, quartile and range
of the per-block ratios, and whether the median speedup clears PAYS (the bar `runtime.CPU_BF16` was
declared against). The CPU's capability is recorded with
the numbers (diffrep.runtime.cpu_bf16): a speedup measured on a CPU with native bf16 says nothing
about one without. Writes bench/results/cpu_precision.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAYS = 0.10  # a median speedup at least this large (and bf16 ahead in at least 3 of 4 blocks) counts as paying
# the decision reads the CPU-time rates (images per CPU-second of this process): on a shared machine a step's wall
# time is mostly waiting for a core, its CPU time is the work; at one thread the two agree when the machine is idle
CLOCK = "cpu"


def time_steps(trainer, start: int, steps: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for `steps` training steps from step index `start`."""
    t, c = time.perf_counter(), time.process_time()
    for i in range(start, start + steps):
        trainer.train_step(i)
    return time.perf_counter() - t, time.process_time() - c


def compare(name: str, cfg, shape, *, blocks: int, steps: int, warmup: int) -> dict:
    """One model, fp32 (A) against bf16 autocast (B), interleaved in `blocks` blocks of `steps` steps."""
    from bench.models import build
    from bench.train import make_trainer
    from diffrep.runtime import resolve_runtime

    arms = {}
    with tempfile.TemporaryDirectory(prefix="bench-prec-") as ckpt:
        for prec in ("fp32", "bf16"):
            spec = build(name, cfg, shape)  # seeded: both arms start from the same weights
            rt = resolve_runtime(cfg.runtime.model_copy(update={"device": "cpu", "precision": prec, "num_threads": 0}))
            trainer = make_trainer(spec, rt, Path(ckpt) / prec)
            trainer.model.train()
            time_steps(trainer, 0, warmup)  # allocator, thread pool, oneDNN kernel choice
            arms[prec] = trainer
        bs = spec.train_cfg.batch_size
        rate = {clock: {"fp32": [], "bf16": []} for clock in ("wall", "cpu")}  # img/s, img per CPU-second
        step = warmup
        for b in range(blocks):
            for prec in (("fp32", "bf16") if b % 2 == 0 else ("bf16", "fp32")):
                wall, cpu = time_steps(arms[prec], step, steps)
                rate["wall"][prec].append(bs * steps / wall)
                rate["cpu"][prec].append(bs * steps / cpu)
            step += steps
        loss = {p: float(t.train_step(step)[0][0]) for p, t in arms.items()}  # both arms on the same step
    out = {"model": name, "batch_size": bs, "item_shape": list(spec.item_shape)}
    for clock, r in rate.items():
        ratios = [b / a for a, b in zip(r["fp32"], r["bf16"])]
        out[clock] = {
            "fp32_img_per_s": round(statistics.median(r["fp32"]), 2),
            "bf16_img_per_s": round(statistics.median(r["bf16"]), 2),
            "ratio_median": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
            "ratio_max": round(max(ratios), 4),
            "ratio_q1": round(statistics.quantiles(ratios, n=4, method="inclusive")[0], 4),  # 3 of 4 blocks above
            "blocks": {p: [round(x, 2) for x in v] for p, v in r.items()}}
    dec = out[CLOCK]
    out["speedup"] = round(dec["ratio_median"] - 1, 4)
    out["pays"] = bool(out["speedup"] >= PAYS and dec["ratio_q1"] > 1.0)
    out["loss_after"] = {p: round(v, 5) for p, v in loss.items()}
    return out


def run(models: list[str], *, blocks: int, steps: int, warmup: int, threads: int, params: Path,
        out: Path | None = None) -> dict:
    """Compare every model; with `out`, the JSON is rewritten (atomically) after each model, so a run cut short
    keeps what it measured."""
    from bench.machine import describe
    from bench.models import image_shape
    from diffrep.config import load_config
    from diffrep.io import write_json
    from diffrep.runtime import cpu_bf16

    cfg = load_config(params)
    threads = threads or cfg.runtime.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = describe(ROOT, threads)
    shape = image_shape(cfg, ROOT)
    cap = cpu_bf16()
    print(f"[cpu_precision] {machine.cpu_model}, {threads} threads, {cap}", file=sys.stderr, flush=True)
    res = {
        "schema": "diffrep-cpu-precision/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.__dict__, "cpu_bf16": cap, "image_shape": list(shape), "params": str(params),
        "settings": {"blocks": blocks, "steps_per_block": steps, "warmup": warmup, "order": "A B, B A, ... (A=fp32)",
                     "pays": f"median bf16/fp32 - 1 >= {PAYS} and the lower quartile of the block ratios > 1, "
                             f"on the {CLOCK} clock"},
        "note": "measured on a shared machine (contention); the arms are interleaved so the ratio is fair",
        "models": [],
    }
    for name in models:
        r = compare(name, cfg, shape, blocks=blocks, steps=steps, warmup=warmup)
        res["models"].append(r)
        for clock in ("wall", "cpu"):
            c = r[clock]
            print(f"[cpu_precision] {name} ({clock} clock): fp32 {c['fp32_img_per_s']:.0f}, bf16 {c['bf16_img_per_s']:.0f}"
                  f" img/s, bf16/fp32 {c['ratio_median']:.3f} [{c['ratio_min']:.3f}, {c['ratio_max']:.3f}]",
                  file=sys.stderr, flush=True)
        print(f"[cpu_precision] {name}: speedup {100 * r['speedup']:+.1f}% ({CLOCK} clock){' pays' if r['pays'] else ''}",
              file=sys.stderr, flush=True)
        machine.load_avg_end = [round(x, 2) for x in os.getloadavg()]
        res["machine"] = machine.__dict__
        if out is not None:
            write_json(out, res)
    return res


def main(argv: list[str] | None = None) -> int:
    from bench.models import TRAINED

    p = argparse.ArgumentParser(prog="python -m bench.cpu_precision", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(TRAINED), help=f"comma-separated (default: {','.join(TRAINED)})")
    # short blocks: on a shared machine the load changes within seconds, and both arms of a block should see the same
    p.add_argument("--blocks", type=int, default=20, help="alternating blocks per arm (default 20)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per block (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: runtime.num_threads, else all)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/cpu_precision.json")
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    if bad := [m for m in models if m not in TRAINED]:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(TRAINED)}")
    if a.blocks < 2 or a.steps < 1 or a.warmup < 0:
        p.error("--blocks must be >= 2, --steps >= 1, --warmup >= 0")
    res = run(models, blocks=a.blocks, steps=a.steps, warmup=a.warmup, threads=a.threads, params=a.params, out=a.out)
    print(json.dumps({r["model"]: {"speedup": r["speedup"], "pays": r["pays"]} for r in res["models"]}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
