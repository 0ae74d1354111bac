"""Reference statistics for Fréchet distance and KID: one named real set, computed once, stored with its hash.

    data/fid_reference/featnet_<set>.npz   features (N, D) float32, mu (D,) and sigma (D, D) float64
    data/fid_reference/manifest.json       set, n, feature space, feature-net sha256, {file: sha256}

Written by the `fid_reference` stage; `load_reference` re-hashes the file
against the manifest, so a changed or damaged reference is refused by name
instead of silently moving every FD (and `diffrep lineage` re-hashes the folder).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffrep.eval.distances import stats
from diffrep.io import ArtifactError, atomic_path, file_hash, read_json, write_json

MANIFEST = "manifest.json"
_RERUN = "re-run `dvc repro fid_reference` to rebuild it"


def save_reference(folder: Path, features: torch.Tensor, *, set_name: str, space: str, featnet_hash: str) -> dict:
    """Write the features and their statistics into `folder` (a temporary folder the caller renames)."""
    name = f"{space}_{set_name}.npz"
    s = stats(features)
    with atomic_path(Path(folder) / name) as tmp:
        with open(tmp, "wb") as f:  # through a file object: np.savez would append .npz to a path
            np.savez(f, features=features.float().numpy(), mu=s["mu"], sigma=s["sigma"])
    manifest = {"set": set_name, "n": len(features), "dim": int(features.shape[1]), "space": space,
                "feature_net_sha256": featnet_hash, "file": name, "files": {name: file_hash(Path(folder) / name)}}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def load_reference(folder: Path) -> tuple[torch.Tensor, dict]:
    """-> (features (N, D) float32, manifest), after checking the file's sha256 against the manifest."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder}/{MANIFEST}: not found; the FD reference statistics are missing: {_RERUN}")
    manifest = read_json(folder / MANIFEST)
    path = folder / str(manifest.get("file"))
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (listed in {MANIFEST}); {_RERUN}")
    if file_hash(path) != manifest.get("files", {}).get(path.name):
        raise ArtifactError(f"{path}: content differs from the sha256 in {MANIFEST} (changed or damaged); {_RERUN}")
    with np.load(path, allow_pickle=False) as z:
        features = torch.from_numpy(z["features"])
    if tuple(features.shape) != (manifest["n"], manifest["dim"]):
        raise ArtifactError(f"{path}: features {tuple(features.shape)}, manifest says ({manifest['n']}, "
                            f"{manifest['dim']}); {_RERUN}")
    return features, manifest
