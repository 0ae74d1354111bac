"""Trained-model artifacts: one `model.pt` (weights-only) + the resolved config beside it.

`model.pt` holds the EMA weights and everything needed to rebuild the
module (its kind, its config section, the image shape and small extras such
as the pose size) as plain tensors and containers, so it loads with
`torch.load(weights_only=True)`. `config.json` is the whole resolved
params of the run that made it (EDM's habit): a reader never has to guess.
`model.pt` also carries a content hash of its tensors and fields, checked by
every load: a stage never computes with a model that changed after it was
written (a flipped byte is refused naming the file).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from diffrep.io import ArtifactError, load_torch, save_torch, write_json

FILE = "model.pt"
# model kind -> the module whose import registers its builder
MODULES = {"soda": "diffrep.models.soda", "ul_stage1": "diffrep.models.ul", "ul_stage2": "diffrep.models.ul",
           "ldae": "diffrep.models.ldae"}
_BUILDERS: dict[str, Callable[[dict, tuple[int, int, int], dict], nn.Module]] = {}


def register(kind: str):
    """Decorator: `build(config_section_dict, image_shape, extra) -> module` for a model kind."""

    def deco(fn):
        _BUILDERS[kind] = fn
        return fn

    return deco


def save_model(out_dir: Path, module: nn.Module, *, kind: str, section: dict, image_shape, extra: dict | None = None,
               full_config: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    payload = {
        "kind": kind,
        "section": json.dumps(section, sort_keys=True),
        "image_shape": list(image_shape),
        "extra": json.dumps(extra or {}, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    save_torch(out_dir / FILE, payload, digest=True)
    if full_config is not None:
        write_json(out_dir / "config.json", full_config)
    return out_dir / FILE


def load_model(path: str | Path, kind: str, init_seed: int | None = None) -> nn.Module:
    """Rebuild a trained model from its folder (or its model.pt) and load the weights (eval mode).

    With `init_seed`, a fresh init of the same architecture instead (the random-init baseline): it
    keeps the artifact's buffers (never learned by gradient descent, e.g. a fitted tokenizer) and
    draws its parameters from `init_seed`, independently of the global RNG.
    """
    path = Path(path)
    file = path / FILE if path.is_dir() else path
    payload = load_torch(file, verify=True)
    try:
        got = payload["kind"]
        section, extra = json.loads(payload["section"]), json.loads(payload["extra"])
        image_shape = tuple(payload["image_shape"])
        state = payload["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file}: not a diffrep model artifact (missing {e}); re-run the stage that makes it") from None
    if got != kind:
        raise ArtifactError(f"{file}: holds a {got!r} model, expected {kind!r}")
    importlib.import_module(MODULES[kind])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if init_seed is None else init_seed)
        module = _BUILDERS[kind](section, image_shape, extra)
    if init_seed is not None:
        buffers = {n for n, _ in module.named_buffers()}
        state = {k: v for k, v in state.items() if k in buffers}
    try:
        module.load_state_dict(state, strict=init_seed is None)
    except RuntimeError as e:
        raise ArtifactError(f"{file}: weights do not fit the {kind} model its config describes ({e}); "
                            "the file was changed after it was written: re-run its stage") from None
    return module.eval()
