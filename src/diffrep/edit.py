"""`diffrep edit soda` and `diffrep interpolate soda`: control of the shapes pipeline's SODA by its z.

  diffrep edit soda --a A.png --b B.png --group G --out grid.png
      one row per image: the image, its decoding, then its decoding with sub-vector G taken from the
      other image (a <- b's group G, b <- a's), all at one camera pose (--azimuth/--elevation) and noise
  diffrep interpolate soda --a A.png --b B.png --n 8 --out strip.png
      the codes on the line between the two images' (Soda.interpolate), decoded from shared noise

Inputs are refused by name before anything is written: a group the model does not have, an image of
the wrong size or channel count, a model the shapes pipeline did not train. The PNG is written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_MODEL = "pipelines/shapes/models/soda"


class EditError(ValueError):
    """A bad input to edit/interpolate: the message names it and what to do."""


def load_shapes_soda(folder: str | Path):
    """The shapes pipeline's SODA, or EditError saying which pipeline the folder's model came from."""
    from diffrep.io import ArtifactError
    from diffrep.models.artifact import load_model

    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise EditError(f"--model {folder}: no SODA artifact there (config.json missing); "
                        f"run `make pipeline-shapes`, or pass the folder of its models/soda")
    source = (json.loads(cfg_file.read_text()).get("data") or {}).get("source")
    try:
        model = load_model(folder, "soda")
    except ArtifactError as e:
        raise EditError(f"--model {folder}: {e}") from None
    if source != "shapes" or not model.pose_dim:
        raise EditError(f"--model {folder}: a SODA from another pipeline (data.source: {source}, "
                        f"{'no' if not model.pose_dim else 'a'} pose-conditioned decoder); edit and interpolate "
                        f"need the shapes pipeline's: --model {DEFAULT_MODEL}")
    return model.requires_grad_(False)


def read_image(path: str, image_shape: tuple[int, int, int], flag: str):
    """A PNG/JPEG -> (1, C, H, W) in [-1, 1], or EditError if its size or channels differ from the model's."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    C, H, W = image_shape
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise EditError(f"{flag} {path}: not a readable image ({e})") from None
    channels = {"L": 1, "RGB": 3}.get(img.mode)
    if channels != C:
        raise EditError(f"{flag} {path}: {len(img.getbands())} channel(s) (mode {img.mode}); the model takes "
                        f"{C} ({'RGB' if C == 3 else 'L'})")
    if img.size != (W, H):
        raise EditError(f"{flag} {path}: {img.size[0]}x{img.size[1]} pixels; the model takes {W}x{H} "
                        "(a render of the shapes pipeline's image_size)")
    arr = np.asarray(img, np.float32).reshape(H, W, C).transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)[None]


def _pose(args, n: int):
    import torch

    az, el = math.radians(args.azimuth), math.radians(args.elevation)
    return torch.tensor([[math.sin(az), math.cos(az), el]], dtype=torch.float32).expand(n, -1)


def edit_grid(model, a, b, group: int, pose, *, seed: int, steps: int | None):
    """(1, C, H, W) images a and b -> (6, C, H, W): a, a decoded, a with b's group; b, b decoded, b with a's."""
    import torch

    from diffrep.eval.control import swap_group

    sizes = model.decoder.z_sizes
    if not 0 <= group < len(sizes):
        raise EditError(f"--group {group}: unknown; this SODA's z has groups 0..{len(sizes) - 1} "
                        f"(sizes {list(sizes)}; 0 = the finest UNet level)")
    x = torch.cat([a, b])
    z = model.encode(x)
    noise = torch.randn((1, *model.image_shape), generator=torch.Generator().manual_seed(seed)).expand(2, -1, -1, -1)
    p = pose[:2]
    plain = model.decode(z, p, noise=noise, steps=steps)
    edited = model.decode(swap_group(z, z.flip(0), sizes, group), p, noise=noise, steps=steps)
    return torch.stack([x, plain, edited], 1).flatten(0, 1)


def main(args: argparse.Namespace) -> int:
    from diffrep.eval.grid import save_grid

    try:
        model = load_shapes_soda(args.model)
        a, b = (read_image(p, model.image_shape, f) for p, f in ((args.a, "--a"), (args.b, "--b")))
        if args.command == "edit":
            images, ncol = edit_grid(model, a, b, args.group, _pose(args, 2), seed=args.seed, steps=args.steps), 3
        else:
            if args.n < 2:
                raise EditError(f"--n {args.n}: an interpolation needs at least 2 images")
            images = model.interpolate(a, b, args.n, seed=args.seed, pose=_pose(args, args.n), steps=args.steps)
            ncol = args.n
        if Path(args.out).suffix.lower() != ".png":
            raise EditError(f"--out {args.out}: write a .png")
    except EditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_grid(args.out, images, ncol=ncol, upscale=3)
    print(f"wrote {args.out}")
    return 0


def add_parsers(sub) -> None:
    """Register `edit` and `interpolate` on the diffrep command line."""
    for name, help_ in (("edit", "swap one z sub-vector between two images (shapes SODA) -> a grid PNG"),
                        ("interpolate", "decode the codes between two images (shapes SODA) -> a strip PNG")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("model_kind", choices=["soda"], help="the model whose z is edited")
        s.add_argument("--a", required=True, help="first image (a render of the model's size and channels)")
        s.add_argument("--b", required=True, help="second image")
        if name == "edit":
            s.add_argument("--group", type=int, required=True, help="z sub-vector to swap (0 = finest UNet level)")
        else:
            s.add_argument("--n", type=int, default=8, help="images in the strip (default 8)")
        s.add_argument("--out", required=True, help="output .png")
        s.add_argument("--model", default=DEFAULT_MODEL, help=f"SODA artifact folder (default {DEFAULT_MODEL})")
        s.add_argument("--azimuth", type=float, default=0.0, help="camera azimuth in degrees (default 0)")
        s.add_argument("--elevation", type=float, default=25.0, help="camera elevation in degrees (default 25)")
        s.add_argument("--seed", type=int, default=0, help="the shared decoding noise")
        s.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's sample_steps)")
        s.set_defaults(func=main)
