"""`python -m bench` (`make bench`): measure, then write one JSON per run (see bench/__init__.py)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

from bench import SCHEMA

EPILOG = """examples:
  python -m bench                                   # micro-benchmarks + quality of the committed metrics/ (~30 s on 2 cores)
  python -m bench --threads 1 --models soda --steps 5
  python -m bench --profile soda                    # + torch.profiler top ops of SODA's training step
  python -m bench --set runtime.channels_last=false # try a runtime setting without editing params.yaml
  python -m bench --pipeline                        # + full dvc repro in a fresh clone (~20 min on 2 cores)
"""


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s)


def _override(text: str) -> dict:
    """'a.b.c=VALUE' (VALUE parsed as YAML) -> {'a': {'b': {'c': VALUE}}}."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE with a dotted params key, got {text!r}")
    out: dict = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.models import MODELS

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated training benchmarks (default: all: {','.join(MODELS)}; '' for none)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per model (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads for every CPU measurement (default: runtime.num_threads, else all)")
    p.add_argument("--matmul-sizes", type=_sizes, default=(1024, 2048), metavar="N,N",
                   help="square fp32 matmul sizes for the yardstick (default 1024,2048)")
    p.add_argument("--matmul-reps", type=int, default=3, help="best of this many timings per size (default 3)")
    p.add_argument("--sample-n", type=int, default=64, help="images per sampling call (default 64)")
    p.add_argument("--sample-steps", type=int, default=0,
                   help="override every sampler's steps (default 0: the params' defaults, as the pipeline samples)")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling benchmarks")
    p.add_argument("--no-cuda", action="store_true", help="do not benchmark on CUDA even when a GPU is present")
    p.add_argument("--profile", default="", metavar="MODEL[,MODEL]|all",
                   help="run torch.profiler on these models' training step; print and save the top ops")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--pipeline", action="store_true",
                   help="also run the full pipeline in a fresh clone of HEAD: wall time, per-stage peak RSS, quality")
    p.add_argument("--keep-clone", action="store_true", help="with --pipeline: keep the clone and its log")
    p.add_argument("--from-metrics", default="metrics", metavar="DIR",
                   help="quality numbers from this metrics folder when --pipeline is not given (default metrics/)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key for this run, e.g. runtime.channels_last=false (repeatable)")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p.add_argument("--root", default=".", help="repository root (default .)")
    p.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.profile = list(MODELS) if args.profile == "all" else [m for m in args.profile.split(",") if m]
    for m in args.models + args.profile:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _asdict(x):
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x


def run_sampling(args, cfg, models, rt) -> list:
    """SODA reconstruction and UL generation at the pipeline's sampler steps (or --sample-steps)."""
    from bench.sampling import bench_soda_reconstruct, bench_ul_generate, soda_steps, ul_steps

    soda, stage1, base = models
    s_steps, (b_steps, d_steps) = soda_steps(cfg), ul_steps(cfg)
    if args.sample_steps:
        s_steps = b_steps = d_steps = args.sample_steps
    out = [bench_soda_reconstruct(soda, args.sample_n, s_steps, rt.device, rt.autocast),
           bench_ul_generate(stage1, base, args.sample_n, b_steps, d_steps, rt.device, rt.autocast)]
    for s in out:
        say(f"sampling {s.what} on {s.device}: {s.img_per_s:.1f} img/s ({s.n} images, steps {s.steps})")
    return out


def run_cuda(args, cfg, shape, flops: dict, sample_models) -> tuple:
    """GPU readiness: the same steps with bf16 autocast and the configured attention backend (auto: xformers)."""
    from bench.machine import matmul_rate
    from bench.models import build
    from bench.train import bench_train
    from diffrep.runtime import resolve_runtime

    rt = resolve_runtime(cfg.runtime.model_copy(update={"device": "cuda", "precision": "bf16", "num_threads": 0}))
    matmul = matmul_rate(rt.device, torch.bfloat16, sizes=(4096, 8192), reps=args.matmul_reps)
    say(f"cuda bf16 matmul: {matmul.gflops:.0f} GFLOP/s")
    train = []
    for name in args.models:  # FLOPs per step are the CPU count: autocast changes dtypes, not the math
        r = bench_train(build(name, cfg, shape), rt, steps=args.steps, warmup=max(args.warmup, 5),
                        matmul_gflops=matmul.gflops, flops_per_step=flops[name])
        train.append(r)
        say(f"cuda train {name}: {r.img_per_s:.0f} img/s, {100 * r.share_of_matmul:.1f}% of bf16 matmul")
    sampling = run_sampling(args, cfg, sample_models, rt) if not args.no_sampling else []
    return matmul, train, sampling


def run_benchmarks(args: argparse.Namespace) -> dict:
    from bench.machine import describe, matmul_rate
    from bench.models import build, image_shape, sampling_models
    from bench.quality import read_quality
    from bench.train import bench_train, profile_train
    from diffrep.config import deep_merge, load_config
    from diffrep.runtime import resolve_runtime

    root = Path(args.root).resolve()
    overrides: dict = {}
    for o in args.overrides:
        overrides = deep_merge(overrides, o)
    cfg = load_config(root / args.params, overrides)
    threads = args.threads or cfg.runtime.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = describe(root, threads)
    say(f"{machine.cpu_model}, {machine.cores} cores, {threads} threads, torch {machine.torch}, "
        f"CUDA {'yes: ' + machine.cuda['name'] if machine.cuda else 'absent'}, load {machine.load_avg_start}")

    matmul = matmul_rate("cpu", sizes=args.matmul_sizes, reps=args.matmul_reps)
    say(f"fp32 matmul: {matmul.gflops:.1f} GFLOP/s (by size {matmul.by_size})")
    shape = image_shape(cfg, root)
    # the pipeline's runtime settings (precision, attention, compile, channels_last), pinned to the CPU
    rt_cpu = resolve_runtime(cfg.runtime.model_copy(update={"device": "cpu", "num_threads": 0}))
    train, flops = [], {}
    for name in args.models:
        r = bench_train(build(name, cfg, shape), rt_cpu, steps=args.steps, warmup=args.warmup,
                        matmul_gflops=matmul.gflops)
        train.append(r)
        flops[name] = r.flops_per_step
        say(f"train {name}: {r.img_per_s:.0f} img/s (batch {r.batch_size}), {r.mflop_per_image:.1f} MFLOP/img, "
            f"{r.gflops:.1f} GFLOP/s = {100 * r.share_of_matmul:.0f}% of matmul")

    profiles = []
    for name in args.profile:
        say(f"profiling {name} ({args.profile_steps} steps) ...")
        prof = profile_train(build(name, cfg, shape), rt_cpu, steps=args.profile_steps)
        print(f"\n=== torch.profiler: {name} training step x{prof.steps}, by self CPU time\n{prof.table}",
              file=sys.stderr, flush=True)
        profiles.append(prof)

    models = sampling_models(cfg, shape)
    sampling = run_sampling(args, cfg, models, rt_cpu) if not args.no_sampling else []

    matmul_cuda, train_cuda, cuda_error = None, [], None
    if torch.cuda.is_available() and not args.no_cuda:
        try:
            matmul_cuda, train_cuda, cuda_sampling = run_cuda(args, cfg, shape, flops, models)
            sampling += cuda_sampling
        except Exception as e:  # a GPU-readiness failure is a finding to record, not a reason to lose the CPU numbers
            cuda_error = f"{type(e).__name__}: {e}"
            say(f"cuda benchmarks failed: {cuda_error}")

    pipeline = None
    if args.pipeline:
        from bench.pipeline import run_pipeline

        pipeline = run_pipeline(root, keep=args.keep_clone, progress=say)
        quality = pipeline.quality
    else:
        mdir = Path(args.from_metrics)
        quality = read_quality(mdir if mdir.is_absolute() else root / mdir, f"{args.from_metrics.rstrip('/')}/")
    machine.load_avg_end = [round(x, 2) for x in os.getloadavg()]
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if args.argv is None else args.argv,
        "settings": {"steps": args.steps, "warmup": args.warmup, "models": args.models, "sample_n": args.sample_n,
                     "sample_steps_override": args.sample_steps or None, "overrides": overrides,
                     "params": args.params, "image_shape": list(shape), "data_source": cfg.data.source},
        "machine": _asdict(machine),
        "matmul": _asdict(matmul),
        "train": [_asdict(r) for r in train],
        "matmul_cuda": _asdict(matmul_cuda),
        "train_cuda": [_asdict(r) for r in train_cuda] or None,
        "cuda_note": cuda_error or (None if machine.cuda_available else "CUDA absent: no GPU benchmarks in this run"),
        "sampling": [_asdict(s) for s in sampling],
        "profiles": [{"model": p.model, "device": p.device, "steps": p.steps, "top": p.top} for p in profiles],
        "quality": quality,
        "pipeline": _asdict(pipeline),
        "bench_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "_profile_tables": {p.model: p.table for p in profiles},  # written as text files, not into the JSON
    }


def main(argv: list[str] | None = None) -> int:
    from bench.report import timestamp, write_run
    from diffrep.config import ConfigError
    from diffrep.io import write_text

    args = parse_args(argv)
    args.argv = argv
    t0, stamp = time.perf_counter(), timestamp()
    try:
        run = run_benchmarks(args)
    except ConfigError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if Path(args.out).is_absolute() else Path(args.root) / args.out
    for model, table in run.pop("_profile_tables").items():
        write_text(out / f"profile-{model}-{stamp}.txt", table + "\n")
    run["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    path = write_run(run, out, stamp)
    say(f"wrote {path} and {out / 'latest.md'} in {run['bench_wall_s']:.0f} s")
    return 0 if run["pipeline"] is None or run["pipeline"]["ok"] else 1
