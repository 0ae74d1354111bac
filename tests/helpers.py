"""Small helpers shared by several test files (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its (partly zero) init, so outputs are not trivially zero and depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_dvc_repo(root, stages, params: dict, sh, message: str = "tiny pipeline"):
    """A git + DVC repository at `root` holding main's code, data/raw and the named stages of dvc.yaml
    (with their plots and artifacts only), on `params`; `sh(*cmd, cwd=...)` runs each command."""
    import shutil
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(repo / "data/raw", root / "data/raw")  # a dependency of prepare
    for f in (".dvcignore", ".gitignore"):
        shutil.copy(repo / f, root)
    dag = yaml.safe_load((repo / "dvc.yaml").read_text())
    dag["stages"] = {k: v for k, v in dag["stages"].items() if k in stages}
    dag["plots"] = [p for p in dag.get("plots", []) if str(p).split("/")[1] in stages]  # models/<stage>/... grids
    dag["artifacts"] = {k: v for k, v in dag.get("artifacts", {}).items() if v["path"].split("/")[1] in stages}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-qm", message)):
        sh(*cmd, cwd=root)
    return root
