"""The resume checkpoint: one atomic `last.pt` per run, loadable with weights_only=True.

It holds only tensors and plain Python containers: model and EMA state dicts,
optimizer and scheduler state, the step, torch's CPU (and current CUDA device)
RNG state, the data-order state, the log history, the run's fingerprint and
its train config as a JSON string.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffrep.io import ArtifactError, load_torch, save_torch

CKPT_NAME = "last.pt"
FORMAT = "diffrep.train/1"


def rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    save_torch(path, {"format": FORMAT, **state})


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    """Load `path` if it was written by a run with this fingerprint; refuse otherwise."""
    ckpt = load_torch(path)  # raises ArtifactError when corrupt or truncated
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a diffrep training checkpoint (format {FORMAT!r} expected); "
                            f"delete the folder {path.parent} and re-run to train from scratch")
    if ckpt.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"{path}: refusing to resume: this checkpoint was written by a run with a different configuration "
            f"or inputs (checkpoint fingerprint {ckpt.get('fingerprint')}, this run's fingerprint {fingerprint}). "
            f"Delete the folder {path.parent} to train this run from scratch, or restore the params and inputs "
            "that produced the checkpoint to continue it.")
    return ckpt
