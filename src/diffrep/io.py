"""Atomic writes, content hashing and safe loading.

Every artifact goes to a temporary file in the destination folder and is
renamed into place, so a killed process never leaves a half-written file.
Temporary names carry the writer's pid (`.NAME.PID.RANDOM.tmp`): the next
write to the same destination removes those of writers that are no longer
running, and puts back a folder that a killed `atomic_dir` had moved aside.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_CHUNK = 1 << 20
DIGEST_KEY = "content_sha256"  # the key save_torch(..., digest=True) adds to a dict


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, corrupt, or from another config."""


def pid_alive(pid: int) -> bool:
    """Is process `pid` running on this host (zombies count as running)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _sweep(path: Path) -> None:
    """Remove the temporary files of dead writers to `path`; restore a folder a dead atomic_dir moved aside."""
    prefix = f".{path.name}."
    for entry in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        parts = entry.name[len(prefix):-len(".tmp")].split(".")  # [pid, random] or [pid, "old"]
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) == os.getpid() or pid_alive(int(parts[0])):
            continue
        if entry.name.endswith(".old.tmp") and not path.exists():
            os.replace(entry, path)  # killed between its two renames: the previous version comes back
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """An OSError while writing (disk full, a short write, permissions) -> ArtifactError naming `path`."""
    try:
        yield
    except OSError as e:
        raise ArtifactError(f"{path}: could not be written ({type(e).__name__}: {e}); nothing was replaced "
                            "(the previous version, if any, is intact): free disk space or fix the permissions "
                            "and re-run") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    With `keep_previous`, an existing `path` is first renamed there (after the new file is complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are shared through git/DVC
    try:
        with _write_errors(path):
            yield tmp
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
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
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)
    old = None
    try:
        with _write_errors(path):
            yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # interrupted between the two renames: keep the previous version
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


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """The array in `path`; mmap: a read-only np.memmap (pages are read when touched, nothing up front)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; run `dvc repro` to create it")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable .npy array ({e})") from e


def save_torch(path: str | os.PathLike, obj: Any, *, digest: bool = False,
               keep_previous: str | os.PathLike | None = None) -> None:
    """torch.save, byte-deterministic: the same tensors give the same file, so DVC skips unchanged downstream stages.

    With `digest`, `obj` (a dict) is saved with its content_digest under DIGEST_KEY, for load_torch(verify=True).
    """
    import torch

    if digest:
        obj = {**obj, DIGEST_KEY: content_digest(obj)}
    with atomic_path(path, keep_previous) as tmp:
        # given a path, torch names the zip's root folder after the (random) temp file; given a file object,
        # it is always "archive"
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def load_torch(path: str | os.PathLike, map_location: str = "cpu", *, verify: bool = False) -> Any:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only.

    With `verify`, the content hash written by save_torch(digest=True) must be there and match.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt zip, pickle of a non-allowed type, truncated file
        raise ArtifactError(
            f"{path}: cannot be loaded as a weights-only checkpoint ({type(e).__name__}: {e}); "
            "it is corrupt or not a diffrep checkpoint: delete it and re-run the stage"
        ) from e
    if verify:
        verify_digest(path, obj)
    return obj


def verify_digest(path: str | os.PathLike, obj: Any) -> None:
    """Check (and remove) the content hash save_torch(digest=True) put into `obj`; refuse `path` by name if it differs."""
    recorded = obj.pop(DIGEST_KEY, None) if isinstance(obj, dict) else None
    if recorded is None:
        raise ArtifactError(f"{path}: has no content hash ({DIGEST_KEY}); it was written by an older diffrep "
                            "or by something else: re-run the stage that makes it")
    now = content_digest(obj)
    if now != recorded:
        raise ArtifactError(f"{path}: damaged: its content hash does not match the one written with it "
                            f"(recorded {recorded[:12]}, now {now[:12]}); the file changed after it was "
                            "written (disk error, partial copy, edit): re-run the stage that makes it")


def content_digest(obj: Any) -> str:
    """sha256 of a nest of dicts, lists, tuples, tensors and scalars: every tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"content_digest: cannot hash a {type(obj).__name__}; store tensors and plain values")


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
