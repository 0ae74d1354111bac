"""Reference statistics for Fréchet distance and KID: one named real set, computed once, stored with its hash.

    data/fid_reference/featnet_<set>_features.npy   (N, D) float32
    data/fid_reference/featnet_<set>_mu.npy         (D,) float64, and _sigma.npy (D, D) float64
    data/fid_reference/manifest.json                set, n, dim, feature space, feature-net sha256, {file: sha256}

Written by the `fid_reference` stage as plain .npy files (byte-deterministic, so
re-running an unchanged stage changes nothing downstream); `load_reference`
re-hashes every file against the manifest, so a changed or damaged reference is
refused by name instead of silently moving every FD (and `diffrep lineage`
re-hashes the folder too).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.eval.distances import stats
from diffrep.io import ArtifactError, file_hash, load_npy, read_json, save_npy, write_json

MANIFEST = "manifest.json"
_RERUN = "re-run `dvc repro fid_reference` to rebuild it"


def save_reference(folder: Path, features: torch.Tensor, *, set_name: str, space: str, featnet_hash: str) -> dict:
    """Write the features and their statistics into `folder` (a temporary folder the caller renames)."""
    folder, prefix = Path(folder), f"{space}_{set_name}"
    arrays = {"features": features.float().numpy(), **stats(features)}
    for key, a in arrays.items():
        save_npy(folder / f"{prefix}_{key}.npy", a)
    manifest = {"set": set_name, "n": len(features), "dim": int(features.shape[1]), "space": space,
                "feature_net_sha256": featnet_hash, "file": f"{prefix}_features.npy",
                "files": {f"{prefix}_{key}.npy": file_hash(folder / f"{prefix}_{key}.npy") for key in arrays}}
    write_json(folder / MANIFEST, manifest)
    return manifest


def save_features(folder: Path, arrays: dict[str, torch.Tensor]) -> None:
    """Named (N, D) feature arrays as <name>.npy (float32) in `folder`, each written atomically."""
    for name, a in arrays.items():
        save_npy(Path(folder) / f"{name}.npy", a.float().numpy())


def load_reference(folder: Path) -> tuple[torch.Tensor, dict]:
    """-> (features (N, D) float32, manifest), after checking every file's sha256 against the manifest."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder}/{MANIFEST}: not found; the FD reference statistics are missing: {_RERUN}")
    manifest = read_json(folder / MANIFEST)
    for name, digest in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST}); {_RERUN}")
        if file_hash(path) != digest:
            raise ArtifactError(f"{path}: content differs from the sha256 in {MANIFEST} (changed or damaged); {_RERUN}")
    if manifest.get("file") not in (manifest.get("files") or {}):
        raise ArtifactError(f"{folder}/{MANIFEST}: names no features file; {_RERUN}")
    features = torch.from_numpy(load_npy(folder / manifest["file"]))
    if tuple(features.shape) != (manifest["n"], manifest["dim"]):
        raise ArtifactError(f"{folder / manifest['file']}: features {tuple(features.shape)}, manifest says "
                            f"({manifest['n']}, {manifest['dim']}); {_RERUN}")
    return features, manifest
