"""The lineage block every metrics file carries (docs/lineage.md).

A block records what a number was computed from: the stage, the resolved
params, every input and output path with its content hash, the git commit
(and whether the tree was dirty), package versions, device, seed, timestamps
and, when orchestrated, the Prefect flow-run id. `diffrep lineage` (see
`audit.py`) re-hashes those paths later and walks upstream through them.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from diffrep.io import path_hash

_PACKAGES = ("diffrep", "torch", "numpy", "dvc", "prefect", "great-expectations", "torchmetrics")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root: Path) -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD", cwd=root)
    # Only code changes make a run "dirty": outputs, metrics and dvc.lock change by design during `dvc repro`.
    # ":/" = from the repository's top, so a pipeline rooted in a sub-folder (pipelines/shapes) sees src/ too.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/flows", ":/pyproject.toml",
                  cwd=root)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def lineage_block(
    stage: str,
    params: dict[str, Any],
    inputs: Iterable[str | Path],
    outputs: Iterable[str | Path],
    *,
    seed: int,
    device: str = "cpu",
    started: str | None = None,
    root: str | Path = ".",
) -> dict[str, Any]:
    """Build the block; paths are recorded relative to `root` with their sha256."""
    root = Path(root).resolve()

    def rel(p: str | Path) -> str:
        p = Path(p).resolve()
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return str(p)

    import torch  # already imported by every stage that writes a block

    return {
        "stage": stage,
        "params": params,
        "inputs": {rel(p): path_hash(p) for p in inputs},
        "outputs": {rel(p): path_hash(p) for p in outputs},
        "git": git_state(root),
        "versions": package_versions(),
        "python": platform.python_version(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "seed": seed,
        "started": started,
        "finished": now_utc(),
        "prefect_flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID") or os.environ.get("DIFFREP_FLOW_RUN_ID"),
    }
