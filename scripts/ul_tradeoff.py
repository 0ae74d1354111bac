#!/usr/bin/env python3
"""The Unified Latents trade-off with generation quality and seeds: bits/px, PSNR and sample FD per loss factor.

    python scripts/ul_tradeoff.py                          # factors 1.5 3 6, seeds 0 1, 2 jobs
    python scripts/ul_tradeoff.py --factors 2 4 --seeds 0 1 2 --jobs 1

Needs main's pipeline outputs (`dvc repro`): data/prepared, models/feature_net and
data/fid_reference are shared by every run, so every FD is measured in the same feature
space against the same reference. Each (loss factor, seed) runs `ul_stage1`, `ul_stage2`
and `generation_eval` in its own scratch root under --work with params.yaml plus the two
overrides (`ul.stage1.loss_factor`, `seed`; the data keep `data.seed`, so every run sees
the same split). A run whose metrics already exist is not run again. Then, for each seed,
neighbouring factors are compared by a paired bootstrap of their samples' FD against the
shared reference (eval/distances.py), and a markdown table goes to --out.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from val_recheck import SHARED, run_variant, variant_root  # noqa: E402  (the same scratch-root runner)


def overrides(factor: float, seed: int) -> str:
    return f"ul.stage1.loss_factor={factor:g} seed={seed}"


def run_one(work: Path, factor: float, seed: int, threads: int) -> Path:
    """One (factor, seed) in its own scratch root (scripts/val_recheck.py's runner); returns the root."""
    return run_variant("ul", overrides(factor, seed), work, threads)


def root_of(work: Path, factor: float, seed: int) -> Path:
    return variant_root("ul", overrides(factor, seed), work)


def samples(root: Path) -> list[torch.Tensor]:
    folder = root / "results/generation_eval"
    return [torch.from_numpy(np.load(p, allow_pickle=False)) for p in sorted(folder.glob("featnet_samples_seed*.npy"))]


def table(work: Path, factors: list[float], seeds: list[int], resamples: int) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from diffrep.eval.distances import distances
    from diffrep.eval.reference import load_reference

    ref, _ = load_reference(ROOT / "data/fid_reference")
    rows = ["| loss factor | seed | bits/px | PSNR (dB) | FD (featnet) | FD above the val floor |", "|---|---|---|---|---|---|"]
    for f in factors:
        for s in seeds:
            root = root_of(work, f, s)
            u = json.loads((root / "metrics/ul_stage1.json").read_text())
            g = json.loads((root / "metrics/generation_eval.json").read_text())
            lo, hi = g["fd_featnet_ci95"]
            alo, ahi = g["fd_featnet_above_floor_ci95"]
            rows.append(f"| {f:g} | {s} | {u['bits_per_pixel']:.4f} | {u['recon_psnr']:.2f} | "
                        f"{g['fd_featnet']:.3f} [{lo:.3f}, {hi:.3f}] | {g['fd_featnet_above_floor']:+.3f} "
                        f"[{alo:+.3f}, {ahi:+.3f}] |")
    tests = ["", "| seed | factor a | factor b | FD a − FD b | 95% interval | p (paired bootstrap) |",
             "|---|---|---|---|---|---|"]
    for s in seeds:
        for a, b in zip(factors, factors[1:]):
            fa, fb = samples(root_of(work, a, s)), samples(root_of(work, b, s))
            d = distances(ref, {"a": fa, "b": fb}, resamples=resamples, seed=s, pairs=[("a", "b")])
            r = next(x for x in d["paired"] if x["metric"] == "fd")
            tests.append(f"| {s} | {a:g} | {b:g} | {r['diff']:+.3f} | [{r['diff_ci95'][0]:+.3f}, "
                         f"{r['diff_ci95'][1]:+.3f}] | {r['p_value']:.3g} |")
    return "\n".join(rows + tests) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--factors", type=float, nargs="+", default=[1.5, 3.0, 6.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each with 2 // jobs threads)")
    p.add_argument("--work", type=Path, default=Path("/tmp/ul-tradeoff"), help="scratch roots (outside the repo)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: print it)")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap draws of the paired FD tests")
    a = p.parse_args(argv)
    for rel in SHARED["ul"]:
        if not (ROOT / rel).exists():
            print(f"ul_tradeoff: {ROOT / rel} is missing; run `dvc repro` first", file=sys.stderr)
            return 2
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    runs = [(f, s) for f in a.factors for s in a.seeds]
    with cf.ThreadPoolExecutor(a.jobs) as pool:  # each run is its own subprocesses
        for root in pool.map(lambda fs: run_one(a.work, *fs, threads), runs):
            print(f"[ul_tradeoff] done: {root}", file=sys.stderr)
    md = table(a.work, a.factors, a.seeds, a.resamples)
    if a.out:
        a.out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
