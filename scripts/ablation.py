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

--split val trains only the stage and compares on the validation split instead (test is never read):
each run's saved model is probed by the same protocol (eval/probe.py: k and lr chosen on val, the probe
trained once per probe seed), fp32 features, and the per-val-image scores are paired the same way:

    python scripts/ablation.py ldae runtime.precision fp32 bf16 --split val    # docs/studies/cpu-precision.md
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
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test: linear_probe's test scores (default); val: probe each run's model on val only")
    a = p.parse_args(argv)
    if not (ROOT / "data/prepared").exists():
        print(f"ablation: {ROOT / 'data/prepared'} is missing; run `dvc repro` first", file=sys.stderr)
        return 2
    import torch

    from diffrep.eval.paired import paired_test

    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    runs = [(v, s) for s in a.seeds for v in (a.a, a.b)]
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        roots = dict(zip(runs, pool.map(lambda r: run_variant(a.rep, f"{a.key}={r[0]} seed={r[1]}", a.work, threads,
                                                              stages=(a.rep,) if a.split == "val" else None), runs)))
    if a.split == "val":
        val = {root: val_probe(root, a.rep) for root in roots.values()}

    def summary(root: Path, rep: str) -> dict:
        if a.split == "val":
            return val[root][0]
        return json.loads((root / "metrics/linear_probe.json").read_text())["representations"][rep]

    def scores(root: Path, clf: str) -> torch.Tensor:
        if a.split == "val":
            return val[root][1][clf]
        return torch.from_numpy(np.load(root / f"results/linear_probe/scores_{a.rep}_{clf}.npy", allow_pickle=False))

    def pct(r: dict) -> str:
        return f"{100 * r['acc']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"

    rows = [f"| {a.key} | seed | {a.split} linear probe | {a.split} kNN |", "|---|---|---|---|"]
    for (v, s), root in roots.items():
        r = summary(root, a.rep)
        rows.append(f"| {v} | {s} | {pct(r['linear'])} | {pct(r['knn'])} |")
    if a.split == "test":
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


def val_probe(root: Path, rep: str) -> tuple[dict, dict]:
    """A run's trained `rep` probed on val by the one protocol -> (summary, per-val-image scores {knn, linear})."""
    import torch

    from diffrep.config import load_config
    from diffrep.data.prepared import load_prepared
    from diffrep.eval.features import feature_fn
    from diffrep.eval.probe import Probe
    from diffrep.models import artifact

    cfg = load_config(root / "params.yaml")
    prep = load_prepared(root / "data/prepared")
    fn = feature_fn(artifact.load_model(root / f"models/{rep}", rep).requires_grad_(False), rep)  # fp32, no autocast
    pair = (fn(prep.images_float("train")), fn(prep.images_float("val")))
    probe = Probe(cfg.probe, torch.from_numpy(prep.labels("train")), prep.num_classes, cfg.seed)
    val_y = torch.from_numpy(prep.labels("val"))
    return probe.report([pair], val_y, probe.choose(pair, val_y))  # report() on val: test is never loaded


if __name__ == "__main__":
    sys.exit(main())
