"""`diffrep embed MODEL --images DIR | --split S --out FILE` and `diffrep export-encoder MODEL --out FILE.safetensors`.

embed: the features of a trained representation model (SODA z, UL clean
latent, l-DAE pooled encoder tokens), computed by the same function the
probes use (eval/features.py `feature_fn`, same batch size), so the features
of `--split test` are the ones the linear_probe stage probes.
  FILE.npy  float32 (N, D) + FILE.json beside it: {"ids": [...], "manifest": {...}}
  FILE.pt   {"features": (N, D), "ids": [...], "manifest": {...}} (loads with weights_only=True)
Image ids: the file's path relative to DIR, or "<split>[<row>]" for a prepared split.
Images of DIR must already have the model's channel count and size (nothing
is resized silently); they are quantised to 8 bits exactly as `prepare` does.

export-encoder: only the tensors the features are computed from (weights
only, safetensors), with the model kind, config and feature layout as
string metadata, for use outside diffrep.

Everything is checked before anything is written; outputs are written to
temporary files and renamed, so a refused or failed run leaves no file.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrep.eval.features import FEATURE_METHODS, feature_fn
from diffrep.io import ArtifactError, atomic_path, file_hash, load_torch, save_npy, save_torch, write_json

BATCH = 500  # the probes' batch size (eval/features.py batched): the same calls, the same numbers
FORMATS = (".npy", ".pt")


class EmbedError(ValueError):
    """The images, the split or the output asked for cannot be embedded (the message says why)."""


def load_encoder(path: str | Path) -> tuple[torch.nn.Module, str, Path]:
    """(model, kind, model.pt) of a representation artifact folder or file; other kinds are refused by name."""
    from diffrep.models.artifact import FILE, load_model

    path = Path(path)
    file = path / FILE if path.is_dir() else path
    if not file.is_file():
        raise ArtifactError(f"{path}: no diffrep model here (expected a folder with {FILE}, e.g. models/soda)")
    payload = load_torch(file, verify=True)
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind not in FEATURE_METHODS:
        raise ArtifactError(f"{file}: holds a {kind!r} model, which has no representation to embed; use one of "
                            f"{', '.join(FEATURE_METHODS)} (models/soda, models/ul_stage1, models/ldae)")
    return load_model(file, kind).requires_grad_(False), kind, file


def feature_layout(model: torch.nn.Module, kind: str) -> dict[str, Any]:
    """What each of the D feature columns is."""
    if kind == "soda":
        return {"what": "SODA bottleneck z", "shape": [model.cfg.z_dim]}
    if kind == "ul_stage1":
        return {"what": "UL clean latent, flattened (channel, row, column)", "shape": list(model.latent_shape)}
    _, h, w = model.image_shape
    p, dim = model.cfg.vit.patch_size, model.cfg.vit.dim
    if model.cfg.feature_pool == "mean":
        return {"what": "l-DAE encoder tokens averaged over tokens", "shape": [dim]}
    return {"what": "l-DAE encoder tokens, flattened (token row-major, then channel)", "shape": [h // p * w // p, dim]}


# ---------------------------------------------------------------- inputs
def folder_images(folder: str | Path, image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[str]]:
    """Every image under `folder` (recursively, sorted) -> ((N, C, H, W) in [-1, 1], relative paths); refusals named."""
    from diffrep.data.prepared import quantise
    from diffrep.data.sources import IMAGE_SUFFIXES, _decode

    folder = Path(folder)
    if not folder.is_dir():
        raise EmbedError(f"--images {folder}: not a folder")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.parts))
    c, h, w = image_shape
    bad, arrays, ids = [], [], []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            bad.append(f"{rel}: not an image file (only {', '.join(IMAGE_SUFFIXES)} are read)")
            continue
        try:
            a = _decode(f)  # (H, W, C) float in [0, 1]
        except Exception as e:  # PIL's errors, or a refused file (animated, decompression bomb)
            bad.append(f"{rel}: cannot decode image ({type(e).__name__}: {e})")
            continue
        if a.shape[2] != c:
            bad.append(f"{rel}: {a.shape[2]} channel(s), the model reads {c} ({'grey' if c == 1 else 'RGB'})")
        elif a.shape[:2] != (h, w):
            bad.append(f"{rel}: {a.shape[1]}x{a.shape[0]} pixels, the model reads {w}x{h}: resize it first")
        else:
            arrays.append(quantise(a.transpose(2, 0, 1)))
            ids.append(rel)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise EmbedError(f"--images {folder}: {len(bad)} file(s) refused: {shown}")
    if not arrays:
        raise EmbedError(f"--images {folder}: no image files found")
    x = torch.from_numpy(np.stack(arrays))  # (N, C, H, W) uint8, as data/prepared stores them
    return x.float().mul_(2.0 / 255.0).sub_(1.0), ids


def split_images(root: str | Path, split: str, image_shape) -> tuple[torch.Tensor, list[str]]:
    """A prepared split (data/prepared under root) -> (images in [-1, 1], ids "<split>[<row>]")."""
    from diffrep.data.prepared import load_prepared

    prep = load_prepared(Path(root) / "data/prepared")
    if tuple(prep.image_shape) != tuple(image_shape):
        raise EmbedError(f"data/prepared holds {tuple(prep.image_shape)} images, the model reads {tuple(image_shape)}:"
                         " it was trained on other data (re-run its stage, or embed the data it was trained on)")
    prep.release_test()  # an explicit request for these features; choices belong to val
    x = prep.image_rows(split)  # memory-mapped: embed() reads it batch by batch
    return x, [f"{split}[{i}]" for i in range(len(x))]


# ---------------------------------------------------------------- embed
def embed(model: torch.nn.Module, kind: str, images: torch.Tensor, *, device="cpu", progress: bool = True) -> torch.Tensor:
    """(N, C, H, W) -> (N, D) float32 features, batch by batch with a progress bar."""
    from tqdm import tqdm

    fn = feature_fn(model.to(device), kind, device=device, batch_size=BATCH)
    chunks = range(0, len(images), BATCH)
    out = [fn(images[i:i + BATCH]) for i in tqdm(chunks, desc=f"embed {kind}", unit="batch", disable=not progress)]
    return torch.cat(out).float()


def run_embed(model_path: str | Path, out: str | Path, *, images: str | Path | None = None, split: str | None = None,
              root: str | Path = ".", device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    if out.suffix not in FORMATS:
        raise EmbedError(f"--out {out}: must end in .npy (array + .json manifest beside it) or .pt")
    if (images is None) == (split is None):
        raise EmbedError("give exactly one of --images DIR or --split {train,val,test}")
    if split is not None and split not in ("train", "val", "test"):
        raise EmbedError(f"--split {split!r}: expected train, val or test")
    model, kind, file = load_encoder(model_path)
    x, ids = folder_images(images, model.image_shape) if images is not None else split_images(root, split, model.image_shape)
    feats = embed(model, kind, x, device=device, progress=progress)  # (N, D)
    manifest = {"model": str(file), "model_sha256": file_hash(file), "kind": kind,
                "feature_method": FEATURE_METHODS[kind], "dim": int(feats.shape[1]), "n": len(ids),
                "layout": feature_layout(model, kind), "image_shape": list(model.image_shape),
                "input": {"images": str(images)} if images is not None else {"split": split, "root": str(root)},
                "params": model.cfg.model_dump(mode="json")}
    if out.suffix == ".npy":
        side = out.with_suffix(".json")
        with ExitStack() as stack:  # both complete before either is renamed into place
            tmp_json = stack.enter_context(atomic_path(side))
            write_json(tmp_json, {"ids": ids, "manifest": manifest})
            save_npy(out, feats.numpy())
    else:
        save_torch(out, {"features": feats, "ids": ids, "manifest": manifest})
    return manifest


# ---------------------------------------------------------------- encoder export
def encoder_keys(model: torch.nn.Module, kind: str) -> list[str]:
    """The state-dict entries the features are computed from: the encoder alone."""
    names = list(model.state_dict())
    if kind in ("soda", "ul_stage1"):
        return [k for k in names if k.startswith("encoder.")]
    n = model.net.n_encoder  # l-DAE: tokenizer, patch embedding, positions, logSNR embedding, first depth/2 blocks
    keep = ("tokenizer.", "net.embed.", "net.temb.", "net.pos", *(f"net.blocks.{i}." for i in range(n)))
    return [k for k in names if k.startswith(keep)]


def export_encoder(model_path: str | Path, out: str | Path) -> list[str]:
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise EmbedError(f"--out {out}: must end in .safetensors")
    model, kind, file = load_encoder(model_path)
    state = model.state_dict()
    keys = encoder_keys(model, kind)
    tensors = {k: state[k].detach().cpu().contiguous() for k in keys}
    meta = {"kind": kind, "feature_method": FEATURE_METHODS[kind], "model_sha256": file_hash(file),
            "image_shape": json.dumps(list(model.image_shape)), "layout": json.dumps(feature_layout(model, kind)),
            "section": json.dumps(model.cfg.model_dump(mode="json"), sort_keys=True)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return keys


def main_embed(args: argparse.Namespace) -> int:
    m = run_embed(args.model, args.out, images=args.images, split=args.split, root=args.root, device=args.device)
    print(f"wrote {m['n']} x {m['dim']} {m['kind']} features to {args.out}", file=sys.stderr)
    return 0


def main_export(args: argparse.Namespace) -> int:
    keys = export_encoder(args.model, args.out)
    print(f"wrote {len(keys)} encoder tensors to {args.out}", file=sys.stderr)
    return 0
