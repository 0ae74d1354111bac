"""How long will the shapes pipeline take? Per-step cost of each training stage at the shapes params,
relative to the same stage at the root (mnist5k) params, measured interleaved in one process (A, B, A, B,
... medians), times the mnist5k stage's own measured train time (metrics/<stage>.json of the root).

    python scripts/shapes_budget.py [--reps 5] [--threads 1]

The ratio is robust to a busy machine (both sides see the same load); the absolute numbers are the root
pipeline's measured ones scaled, so they hold for a machine as idle as the one that measured those.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffrep.config import load_config
from diffrep.eval.feature_net import FeatureNet
from diffrep.models.ldae import Ldae
from diffrep.models.soda import Soda
from diffrep.models.ul import UnifiedLatents
from diffrep.train.rng import BatchRNG

ROOT = Path(__file__).resolve().parents[1]


def models(cfg, shape, views: int | None):
    """(stage, model, batch, steps) of the four training stages under one config."""
    C, H, W = shape
    out = []
    for stage, section, build in (("soda", cfg.soda, lambda: Soda(cfg.soda, shape, pose_dim=3 if views else 0)),
                                  ("ul_stage1", cfg.ul.stage1, lambda: UnifiedLatents(cfg.ul.stage1, shape)),
                                  ("ldae", cfg.ldae, lambda: Ldae(cfg.ldae, shape)),
                                  ("feature_net", cfg.feature_net, lambda: FeatureNet(cfg.feature_net, shape, 8))):
        B = section.train.batch_size
        if stage == "soda" and views:
            batch = {"images": torch.rand(B, views, C, H, W) * 2 - 1, "poses": torch.rand(B, views, 3)}
        else:
            batch = {"images": torch.rand(B, C, H, W) * 2 - 1, "labels": torch.randint(0, 8, (B,))}
        model = build()
        if stage == "ldae":
            model.fit_tokenizer(torch.rand(200, C, H, W) * 2 - 1, seed=0)
        out.append((stage, model, batch, section.train.steps))
    return out


def step_time(model, batch, opt) -> float:
    t = time.perf_counter()
    loss, _ = model(batch, BatchRNG(0, 0, len(batch["images"])))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def decode_time(model, n: int, pose: bool) -> float:
    z = torch.randn(n, model.cfg.z_dim)
    p = torch.rand(n, 3) if pose else None
    t = time.perf_counter()
    model.decode(z, p, steps=5)
    return (time.perf_counter() - t) / (5 * n)  # seconds per image per DDIM step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a_cfg, b_cfg = load_config(ROOT / "params.yaml"), load_config(ROOT / "pipelines/shapes/params.yaml")
    s = b_cfg.data.image_size
    sides = {"mnist5k": models(a_cfg, (1, 16, 16), None),
             "shapes": models(b_cfg, (3, s, s), b_cfg.data.shapes.views_per_object)}
    rows = []
    for i, (stage, *_rest) in enumerate(sides["mnist5k"]):
        opts = {k: torch.optim.Adam(v[i][1].parameters(), 1e-4) for k, v in sides.items()}
        times = {k: [] for k in sides}
        for r in range(args.reps + 1):
            for k, v in sides.items():
                t = step_time(v[i][1], v[i][2], opts[k])
                if r:  # the first round warms up
                    times[k].append(t)
        med = {k: statistics.median(t) for k, t in times.items()}
        base = json.loads((ROOT / f"metrics/{stage}.json").read_text())
        ratio = med["shapes"] / med["mnist5k"]
        steps_a, steps_b = sides["mnist5k"][i][3], sides["shapes"][i][3]
        rows.append({"stage": stage, "step_s_mnist5k": med["mnist5k"], "step_s_shapes": med["shapes"],
                     "ratio": ratio, "mnist5k_train_s": base["train_s"], "mnist5k_steps": steps_a,
                     "shapes_steps": steps_b, "shapes_train_s": base["train_s"] * ratio * steps_b / steps_a})
    soda_a, soda_b = sides["mnist5k"][0][1], sides["shapes"][0][1]
    dec = [(decode_time(soda_a, 50, False), decode_time(soda_b, 50, True)) for _ in range(3)]
    dec_ratio = statistics.median(b / a for a, b in dec)
    print("| stage | step s (mnist5k) | step s (shapes) | ratio | mnist5k train s (measured) | steps | "
          "shapes train s (extrapolated) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['step_s_mnist5k']:.3f} | {r['step_s_shapes']:.3f} | {r['ratio']:.2f} | "
              f"{r['mnist5k_train_s']:.0f} | {r['mnist5k_steps']} -> {r['shapes_steps']} | {r['shapes_train_s']:.0f} |")
    print(f"\nSODA decoding, per image per step: shapes / mnist5k = {dec_ratio:.2f}")
    print(f"training total (extrapolated): {sum(r['shapes_train_s'] for r in rows) / 60:.1f} min")


if __name__ == "__main__":
    main()
