"""`diffrep sample ul --n N --out FILE`: draw images from the trained Unified Latents models.

`sample_ul` loads models/ul_stage1 (decoder) and models/ul_stage2 (base
model) and generates in chunks; chunk i uses a seed derived from (seed, i),
so the first k images of a run with n > k equal a run with n = k.
FILE.png -> a grid; FILE.npy -> uint8 (N, C, H, W) array (e.g. for FID).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

CHUNK = 500


@torch.no_grad()
def sample_ul(stage1_dir: str | Path, stage2_dir: str | Path, n: int, seed: int = 0, *,
              base_steps: int | None = None, decoder_steps: int | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """n images (n, C, H, W) in [-1, 1] on the CPU; the same (n, seed) gives the same images on one device type."""
    from diffrep.models.artifact import load_model
    from diffrep.models.ul import generate
    from diffrep.train.rng import derive_seed

    if n < 1:
        raise ValueError(f"sample_ul: n must be >= 1, got {n}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stage1 = load_model(stage1_dir, "ul_stage1").to(device)
    base = load_model(stage2_dir, "ul_stage2").to(device)
    out = [generate(stage1, base, min(CHUNK, n - i), seed=derive_seed("ul-sample", seed, i // CHUNK),
                    base_steps=base_steps, decoder_steps=decoder_steps, device=device).cpu()
           for i in range(0, n, CHUNK)]
    return torch.cat(out)


def main_sample(args: argparse.Namespace) -> int:
    """CLI: args.model ('ul'), args.n, args.out (.png or .npy), args.seed, args.root. Returns the exit code."""
    import math
    import sys

    from diffrep.eval.grid import save_grid, to_uint8
    from diffrep.io import ArtifactError, save_npy

    if args.model != "ul":
        print(f"diffrep sample: model {args.model!r} cannot generate; only 'ul' can", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        print(f"diffrep sample: --out {out} must end in .png (a grid) or .npy (a uint8 array)", file=sys.stderr)
        return 2
    root = Path(args.root)
    try:
        images = sample_ul(root / "models/ul_stage1", root / "models/ul_stage2", args.n, args.seed)
    except (ArtifactError, ValueError) as e:
        print(f"diffrep sample: {e} (run `dvc repro ul_stage2` first)", file=sys.stderr)
        return 1
    if out.suffix == ".png":
        save_grid(out, images, ncol=max(1, math.ceil(math.sqrt(len(images)))))
    else:
        save_npy(out, to_uint8(images).transpose(0, 3, 1, 2))  # (N, C, H, W) uint8
    print(f"wrote {len(images)} samples to {out}")
    return 0
