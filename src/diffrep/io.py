"""Atomic writes, content hashing and safe loading.

Every artifact goes to a temporary file in the destination folder and is
renamed into place, so a killed process never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, corrupt, or from another config."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are shared through git/DVC
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it in for `path` on success.

    On failure the temporary folder is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); re-create it by re-running its stage") from e


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def load_npy(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; run `dvc repro` to create it")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable .npy array ({e})") from e


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save, byte-deterministic: the same tensors give the same file, so DVC skips unchanged downstream stages."""
    import torch

    with atomic_path(path) as tmp:
        # given a path, torch names the zip's root folder after the (random) temp file; given a file object,
        # it is always "archive"
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def load_torch(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt zip, pickle of a non-allowed type, truncated file
        raise ArtifactError(
            f"{path}: cannot be loaded as a weights-only checkpoint ({type(e).__name__}: {e}); "
            "it is corrupt or not a diffrep checkpoint: delete it and re-run the stage"
        ) from e


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def path_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file hash) listing."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file() and "__pycache__" not in q.parts):
            h.update(f"{p.relative_to(path).as_posix()}\0{file_hash(p)}\n".encode())
        return h.hexdigest()
    raise ArtifactError(f"{path}: not found")


def json_hash(obj: Any) -> str:
    """A stable sha256 of a JSON-able object (used for config fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()
