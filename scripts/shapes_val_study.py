#!/usr/bin/env python3
"""Choose a SODA setting of the shapes pipeline on val: novel views, reconstructions and kNN of z.

    python scripts/shapes_val_study.py 'soda.diffusion.parameterization=v'
    python scripts/shapes_val_study.py 'soda.diffusion.parameterization=v' 'soda.train.steps=1800' --jobs 2

Needs the shapes pipeline's outputs (`make pipeline-shapes`). Each variant (one quoted string of
KEY=VALUE overrides on pipelines/shapes/params.yaml) trains the `soda` stage in a scratch root under
--work that shares pipelines/shapes/data/prepared; main's own models/soda is the baseline. All are
then compared on the **val** objects only (test is never read for the choice): each object's first
view is encoded and rendered at its own pose (reconstruction) and at its last view's pose (novel
view, k = 1), from the same noise for every model; PSNR per object with a 95% bootstrap interval
and a paired sign-flip test against main (eval/nvs.py, eval/paired.py); the copy-source baseline on
the same objects; and the online val kNN of z at the last step (metrics/soda.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PIPE = ROOT / "pipelines/shapes"
sys.path.insert(0, str(ROOT / "scripts"))
from val_recheck import run_variant  # noqa: E402  (the same scratch-root runner, on the shapes pipeline)


def val_scores(roots: dict[str, Path], seed: int, resamples: int) -> list[str]:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from diffrep.data.prepared import group_views, load_prepared
    from diffrep.eval.intervals import bootstrap_mean
    from diffrep.eval.paired import paired_test
    from diffrep.eval.recon import psnr_per_image
    from diffrep.models.artifact import load_model

    prep = load_prepared(PIPE / "data/prepared")
    views, poses = group_views(prep.images_float("val"), torch.from_numpy(prep.array("val", "poses")),
                               torch.from_numpy(prep.array("val", "object_ids")))  # (n, V, C, H, W), (n, V, P)
    src, tgt = views[:, 0], views[:, -1]
    noise = torch.randn(src.shape, generator=torch.Generator().manual_seed(seed))
    per: dict[str, dict[str, torch.Tensor]] = {}
    for name, root in roots.items():
        model = load_model(root / "models/soda", "soda").eval()
        z = model.encode(src)
        per[name] = {"recon": psnr_per_image(model.decode(z, poses[:, 0], noise=noise), src),
                     "nvs": psnr_per_image(model.decode(z, poses[:, -1], noise=noise), tgt)}
    copy = psnr_per_image(src, tgt)

    def ci(v):
        lo, hi = bootstrap_mean(v, resamples=resamples, seed=seed)
        return f"{float(v.mean()):.2f} [{lo:.2f}, {hi:.2f}]"

    rows = [f"{len(src)} val objects. PSNR (dB), 95% bootstrap over objects; paired sign-flip test against main.", "",
            "| variant | val kNN (z) | recon PSNR | NVS PSNR (k=1) | NVS − main | p |", "|---|---|---|---|---|---|"]
    for name, root in roots.items():
        knn = json.loads((root / "metrics/soda.json").read_text())["online"]["val_knn_last"]
        t = paired_test(per[name]["nvs"], per["main"]["nvs"], resamples=resamples, seed=seed)
        d = "" if name == "main" else f"{t['diff']:+.2f} | {t['p_value']:.3g}"
        rows.append(f"| {name} | {100 * knn:.1f}% | {ci(per[name]['recon'])} | {ci(per[name]['nvs'])} | {d or ' | '} |")
    rows.append(f"| copy the source view | | | {ci(copy)} | | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", help="one quoted 'KEY=VALUE KEY=VALUE' string per variant")
    p.add_argument("--work", type=Path, default=Path("/tmp/shapes-val-study"), help="scratch roots (outside the repo)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once (threads split between them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000)
    a = p.parse_args(argv)
    for rel in ("data/prepared", "models/soda", "metrics/soda.json"):
        if not (PIPE / rel).exists():
            print(f"shapes_val_study: {PIPE / rel} is missing; run `make pipeline-shapes` first", file=sys.stderr)
            return 2
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        trained = dict(zip(a.variants, pool.map(lambda v: run_variant("soda", v, a.work, threads, ("soda",), PIPE), a.variants)))
    print("\n".join(val_scores({"main": PIPE} | trained, a.seed, a.resamples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
