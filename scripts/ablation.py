#!/usr/bin/env python3
"""A representation's ablation with seeds and paired tests: one param, two values, same split.

    python scripts/ablation.py ldae ldae.noise_space latent pixel        # l-DAE: noise in the PCA latent vs pixels
    python scripts/ablation.py soda soda.views augment same              # SODA: novel views vs auto-encoding
    python scripts/ablation.py soda soda.views augment same --seeds 0 1 2 --jobs 1

Each (value, seed) trains the representation's stage and runs `linear_probe` in a scratch root
on main's data/prepared (scripts/val_recheck.py's runner), so all runs share one split. The probe
protocol chooses lr and k on val; each run's per-test-image scores
(results/linear_probe/scores_*.npy) let the two values be compared image by image, per seed:
exact McNemar for kNN, the sign-flip permutation test for the seed-averaged probe
(eval/paired.py). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))
from val_recheck import run_variant  # noqa: E402  (the same scratch-root runner)

REPRESENTATIONS = ("ldae", "soda")  # val_recheck.STAGES: each trains its stage, then linear_probe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rep", choices=REPRESENTATIONS, help="the representation (its stage is trained per run)")
    p.add_argument("key", help="the dotted params.yaml key, e.g. soda.views")
    p.add_argument("a", help="first value (usually main's default)")
    p.add_argument("b", help="second value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/ablation"), help="scratch roots (outside the repo)")
    a = p.parse_args(argv)
    if not (ROOT / "data/prepared").exists():
        print(f"ablation: {ROOT / 'data/prepared'} is missing; run `dvc repro` first", file=sys.stderr)
        return 2
    import torch

    from diffrep.eval.paired import paired_test

    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    runs = [(v, s) for s in a.seeds for v in (a.a, a.b)]
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        roots = dict(zip(runs, pool.map(lambda r: run_variant(a.rep, f"{a.key}={r[0]} seed={r[1]}", a.work, threads),
                                        runs)))

    def summary(root: Path, rep: str) -> dict:
        return json.loads((root / "metrics/linear_probe.json").read_text())["representations"][rep]

    def scores(root: Path, clf: str) -> torch.Tensor:
        return torch.from_numpy(np.load(root / f"results/linear_probe/scores_{a.rep}_{clf}.npy", allow_pickle=False))

    def pct(r: dict) -> str:
        return f"{100 * r['acc']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"

    rows = [f"| {a.key} | seed | linear probe | kNN |", "|---|---|---|---|"]
    for (v, s), root in roots.items():
        r = summary(root, a.rep)
        rows.append(f"| {v} | {s} | {pct(r['linear'])} | {pct(r['knn'])} |")
    raw = summary(roots[runs[0]], "raw_pixels")
    rows.append(f"| raw pixels (no training) | — | {pct(raw['linear'])} | {pct(raw['knn'])} |")
    rows += ["", f"| seed | classifier | {a.a} − {a.b} | test | p | verdict |", "|---|---|---|---|---|---|"]
    for s in a.seeds:
        for clf in ("linear", "knn"):
            t = paired_test(scores(roots[(a.a, s)], clf), scores(roots[(a.b, s)], clf), resamples=2000, seed=s)
            rows.append(f"| {s} | {clf} | {100 * t['diff']:+.1f} points | {t['test']} | {t['p_value']:.2g} | "
                        f"{a.a} {t['verdict']} {a.b} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
