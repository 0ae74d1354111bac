"""Choose a SODA model's sampler grid (diffusion.sample_grid) on val: reconstruction and, for 3D data, novel views.

    python scripts/sample_grid_choice.py --model models/soda --prepared data/prepared \
        [--featnet models/feature_net] [--n 200] [--steps N] [--out grid_choice.json]

For each grid (same | cosine | linear_logsnr) the same val images are decoded from the same noise:
PSNR and SSIM (mean, 95% bootstrap interval over images), paired against `same`, and with --featnet the
Fréchet distance of the decodings to the val images in the feature-net space. 3D data (poses): the
reconstruction is the first view at its own pose, the novel view the last view from the first. Only val
is read: the choice is then written into params.yaml by hand, and test is read once by the pipeline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffrep.data.prepared import group_views, load_prepared
from diffrep.diffusion import SAMPLE_GRIDS
from diffrep.eval import nvs
from diffrep.eval.distances import distances
from diffrep.eval.feature_net import load_feature_net
from diffrep.eval.features import batched, spread
from diffrep.io import write_json
from diffrep.models.artifact import load_model


def with_grid(model, grid: str):
    """The same model, sampling on `grid` (configs are frozen: a copy of the section)."""
    d = model.cfg.diffusion.model_copy(update={"sample_grid": grid})
    model.cfg = model.cfg.model_copy(update={"diffusion": d})
    return model


def tasks(prep, n: int) -> dict[str, tuple]:
    """task -> (sources (n, k, C, H, W), render poses (n, P) or None, targets (n, C, H, W))."""
    x = prep.images_float("val")
    poses = prep.array("val", "poses")
    if poses is None:
        pick = spread(len(x), n)
        return {"reconstruction": (x[pick, None], None, x[pick])}
    views, p = group_views(x, torch.from_numpy(poses), torch.from_numpy(prep.array("val", "object_ids")))
    views, p = views[:n], p[:n]
    return {"reconstruction": (views[:, :1], p[:, 0], views[:, 0]),
            "novel_view": (views[:, :1], p[:, -1], views[:, -1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/soda")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--featnet", default=None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = load_model(args.model, "soda").requires_grad_(False)
    prep = load_prepared(args.prepared)
    net = load_feature_net(args.featnet) if args.featnet else None
    result = {"model": args.model, "steps": args.steps or model.cfg.diffusion.sample_steps, "split": "val"}
    for task, (src, pose, target) in tasks(prep, args.n).items():
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(target.shape, generator=g)
        z = batched(lambda s: nvs.multi_view_z(model, s), src)
        preds = {}
        for grid in SAMPLE_GRIDS:
            m = with_grid(model, grid)
            fn = (lambda zz, nn: m.decode(zz, noise=nn, steps=args.steps)) if pose is None else \
                (lambda zz, nn, pp: m.decode(zz, pp, noise=nn, steps=args.steps))
            preds[grid] = batched(fn, z, noise, *(() if pose is None else (pose,)), batch_size=100)
        table = nvs.score_table(preds, target, resamples=args.bootstrap, seed=args.seed,
                                against=[(g, "same") for g in SAMPLE_GRIDS[1:]])
        if net is not None:
            f = lambda x: batched(net.features, x).float()
            fd = distances(f(target), {k: [f(v)] for k, v in preds.items()}, resamples=200, seed=args.seed)
            for k in preds:
                table["methods"][k] |= {"fd": fd[k]["fd"], "fd_ci95": fd[k]["fd_ci95"]}
        result[task] = table
        print(f"\n{task} ({len(target)} val {'objects' if pose is not None else 'images'}, "
              f"{result['steps']} steps)\n| grid | PSNR (dB) | SSIM | FD |\n|---|---|---|---|")
        for k, r in table["methods"].items():
            fd = f"{r['fd']:.3f} [{r['fd_ci95'][0]:.3f}, {r['fd_ci95'][1]:.3f}]" if "fd" in r else "-"
            print(f"| {k} | {r['psnr']:.2f} [{r['psnr_ci95'][0]:.2f}, {r['psnr_ci95'][1]:.2f}] | "
                  f"{r['ssim']:.3f} [{r['ssim_ci95'][0]:.3f}, {r['ssim_ci95'][1]:.3f}] | {fd} |")
        for r in table["paired"]:
            print(f"  {r['a']} - {r['b']} {r['metric']}: {r['diff']:+.3f} [{r['diff_ci95'][0]:+.3f}, "
                  f"{r['diff_ci95'][1]:+.3f}], p={r['p_value']:.3g} ({r['verdict']})")
    if args.out:
        write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
