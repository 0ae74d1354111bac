#!/usr/bin/env python3
"""l-DAE's key ablation with seeds and paired tests: noise in the PCA latent against noise in pixels.

    python scripts/ldae_noise_space.py                 # seeds 0 1, two runs at a time
    python scripts/ldae_noise_space.py --seeds 0 1 2 --jobs 1

Each (noise space, seed) trains `ldae` and runs `linear_probe` in a scratch root on main's
data/prepared (scripts/val_recheck.py's runner), so all runs share one split. The probe protocol
chooses lr and k on val; each run's per-test-image scores (results/linear_probe/scores_*.npy) let
the two noise spaces be compared image by image, per seed: exact McNemar for kNN, the sign-flip
permutation test for the seed-averaged probe (eval/paired.py). Prints a markdown table.
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

SPACES = ("latent", "pixel")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/ldae-noise-space"), help="scratch roots (outside the repo)")
    a = p.parse_args(argv)
    if not (ROOT / "data/prepared").exists():
        print(f"ldae_noise_space: {ROOT / 'data/prepared'} is missing; run `dvc repro` first", file=sys.stderr)
        return 2
    import torch

    from diffrep.eval.paired import paired_test

    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    runs = [(space, s) for s in a.seeds for space in SPACES]
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        roots = dict(zip(runs, pool.map(lambda r: run_variant("ldae", f"ldae.noise_space={r[0]} seed={r[1]}",
                                                               a.work, threads), runs)))

    def summary(root: Path, rep: str) -> dict:
        return json.loads((root / "metrics/linear_probe.json").read_text())["representations"][rep]

    def scores(root: Path, rep: str, clf: str) -> torch.Tensor:
        return torch.from_numpy(np.load(root / f"results/linear_probe/scores_{rep}_{clf}.npy", allow_pickle=False))

    def pct(r: dict) -> str:
        return f"{100 * r['acc']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"

    rows = ["| noise space | seed | linear probe | kNN |", "|---|---|---|---|"]
    for (space, s), root in roots.items():
        r = summary(root, "ldae")
        rows.append(f"| {space} | {s} | {pct(r['linear'])} | {pct(r['knn'])} |")
    raw = summary(roots[runs[0]], "raw_pixels")
    rows.append(f"| raw pixels (no training) | — | {pct(raw['linear'])} | {pct(raw['knn'])} |")
    rows += ["", "| seed | classifier | latent − pixel | test | p | verdict |", "|---|---|---|---|---|---|"]
    for s in a.seeds:
        for clf in ("linear", "knn"):
            t = paired_test(scores(roots[("latent", s)], "ldae", clf), scores(roots[("pixel", s)], "ldae", clf),
                            resamples=2000, seed=s)
            rows.append(f"| {s} | {clf} | {100 * t['diff']:+.1f} points | {t['test']} | {t['p_value']:.2g} | "
                        f"latent {t['verdict']} pixel |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
