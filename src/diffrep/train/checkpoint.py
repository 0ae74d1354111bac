"""Resume checkpoints: `last.pt` and the one before it, `prev.pt`, each loadable with weights_only=True.

A checkpoint holds only tensors and plain Python containers: model and EMA
state dicts, optimizer and scheduler state, the step, torch's CPU (and
current CUDA device) RNG state, the data-order state, the log history, the
run's fingerprint, its train config as a JSON string, and a content hash of
all of that (io.content_digest) checked on load.

Writing a new `last.pt` first renames the old one to `prev.pt` (after the new
file is complete). On resume a checkpoint that is truncated, damaged (hash
mismatch) or of another format is refused by name and renamed to
`<name>.refused`; the engine then tries `prev.pt`, else starts from step 0.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffrep.io import ArtifactError, load_torch, save_torch, verify_digest

CKPT_NAME = "last.pt"
PREV_NAME = "prev.pt"
FORMAT = "diffrep.train/2"  # 2: content hash, prev.pt kept


class CheckpointRefused(ArtifactError):
    """A checkpoint that cannot be used (corrupt, truncated, another format): fall back, never resume from it."""


def rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path = Path(path)
    save_torch(path, {"format": FORMAT, **state}, digest=True, keep_previous=path.with_name(PREV_NAME))


def load_checkpoint(path: Path, fingerprint: str, n_items: int | None = None,
                    batch_size: int | None = None) -> dict[str, Any]:
    """Load `path` if it is intact and was written by a run with this fingerprint (and data size, batch size).

    CheckpointRefused when it is unusable; ArtifactError (or ValueError) when it belongs to another run:
    the user must decide.
    """
    try:
        ckpt = load_torch(path)
    except ArtifactError as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [""])[0][:160]
        raise CheckpointRefused(f"{path}: unreadable, truncated or damaged ({type(cause).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointRefused(f"{path}: checkpoint format {got!r}, this code reads {FORMAT!r} (written by an "
                                "older diffrep, or not a diffrep checkpoint)")
    try:
        verify_digest(path, ckpt)
    except ArtifactError as e:
        raise CheckpointRefused(str(e)) from e
    if ckpt.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"{path}: refusing to resume: this checkpoint was written by a run with a different configuration "
            f"or inputs (checkpoint fingerprint {ckpt.get('fingerprint')}, this run's fingerprint {fingerprint}). "
            f"Delete the folder {path.parent} to train this run from scratch, or restore the params and inputs "
            "that produced the checkpoint to continue it.")
    order = ckpt["data_order"]
    if n_items is not None and (order["n_items"], order["batch_size"]) != (n_items, batch_size):
        raise ValueError(f"{path}: written for {order['n_items']} items at batch {order['batch_size']}, "
                         f"this run has {n_items} at {batch_size} under the same fingerprint "
                         f"(the fingerprint must cover the data); delete {path.parent} and re-run")
    return ckpt


def load_latest(ckpt_dir: Path, fingerprint: str, n_items: int | None = None,
                batch_size: int | None = None) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
    """(checkpoint, its file, why each newer one was refused): last.pt, else prev.pt, else (None, None, reasons)."""
    refused = []
    for path in (Path(ckpt_dir) / CKPT_NAME, Path(ckpt_dir) / PREV_NAME):
        if not path.exists():
            continue
        try:
            return load_checkpoint(path, fingerprint, n_items, batch_size), path, refused
        except CheckpointRefused as e:
            os.replace(path, path.with_name(path.name + ".refused"))  # out of the way of the next save
            refused.append(f"{e} [renamed to {path.name}.refused]")
    return None, None, refused
