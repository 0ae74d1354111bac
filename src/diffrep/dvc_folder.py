"""Which files inside a DVC-tracked folder changed since dvc.lock recorded it.

DVC records a folder output as one md5 ending in `.dir`; the cache object of that
name lists every file in it with its own md5. Comparing that listing with the
folder on disk names the changed files, where `dvc status` only says "modified"
for the whole folder. Used by the lineage audit (audit.py).
"""
from __future__ import annotations

import configparser
import hashlib
import json
from pathlib import Path
from typing import Any


def dvc_cache_dir(root: Path) -> Path:
    """The local DVC cache: `[cache] dir` of .dvc/config(.local) (relative to .dvc/), else .dvc/cache."""
    cfg = configparser.ConfigParser()
    cfg.read([root / ".dvc/config", root / ".dvc/config.local"])  # missing files are skipped
    d = cfg.get("cache", "dir", fallback=None)
    return (root / ".dvc" / d).resolve() if d else root / ".dvc/cache"


def _dir_manifest(root: Path, md5: str) -> dict[str, str] | None:
    """DVC's listing of a folder ({relpath: md5}) from the cache object `<md5>.dir`; None when not cached."""
    cache = dvc_cache_dir(root)
    for base in (cache / "files/md5", cache):  # DVC 3 layout, then DVC 2's
        obj = base / md5[:2] / md5[2:]
        if obj.is_file():
            try:
                return {e["relpath"]: e["md5"] for e in json.loads(obj.read_text())}
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def changed_files(root: Path, lock: dict[str, Any] | None, rel: str, limit: int = 10) -> str | None:
    """For a folder tracked by DVC: which files in it differ from dvc.lock's listing, e.g.
    "modified: model.pt; added: x.npy". `lock` is dvc.lock's `stages` mapping, `rel` the folder
    relative to `root`. None when `rel` is not a cached DVC folder output."""
    md5 = next((o.get("md5") for e in (lock or {}).values() for o in e.get("outs", [])
                if Path(o["path"]).as_posix().removeprefix("./").rstrip("/") == rel), None)
    folder = root / rel
    if not md5 or not md5.endswith(".dir") or not folder.is_dir():
        return None
    recorded = _dir_manifest(root, md5)
    if recorded is None:
        return None
    now = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    kinds = {
        "modified": [r for r in recorded if r in now and _md5(now[r]) != recorded[r]],
        "added": [r for r in now if r not in recorded],
        "deleted": [r for r in recorded if r not in now],
    }
    parts = []
    for kind, names in kinds.items():
        if names:
            more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
            parts.append(f"{kind}: {', '.join(sorted(names)[:limit])}{more}")
    return "; ".join(parts) or None
