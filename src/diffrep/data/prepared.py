"""The prepared-data format (`data/prepared/`, written by the `prepare` stage) and its loader.

    train_images.npy  uint8 (N, C, H, W), round(x * 255) of the validated [0, 1] floats
    train_labels.npy  int64 (N,)
    val_images.npy, val_labels.npy, test_images.npy, test_labels.npy
    {split}_factors.npy float32 (N, F), {split}_poses.npy float32 (N, P),
    {split}_object_ids.npy int64 (N,)          only for sources that have them
    manifest.json     source, image_shape, class_names, num_classes, counts,
                      class_counts, factor_names, pose_layout, seed,
                      test_fraction, val_fraction, files {name: sha256}

uint8 keeps the folder small (DVC caches it) and exact: images_float()
maps k/255 to 2k/255 - 1 in [-1, 1], the range every model trains in.

Larger than memory: the image files are memory-mapped (read-only), so loading
costs no RAM; `image_rows(split)` hands the Trainer a view whose steps read only
their rows (train/batches.py), and images_float() converts in chunks.
Verification still hashes every file, streaming (io.file_hash).

Choose on val, report on test, once: a loaded `Prepared` refuses to hand out
the test split until `release_test()` is called, which a stage does after every
choice (probe settings, kNN k, ...) has been made on val. A stage that peeks at
test while choosing fails with `TestSplitLocked` instead of silently tuning on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffrep.data.split import Split
from diffrep.data.types import Listing
from diffrep.io import ArtifactError, file_hash, load_npy, read_json, save_npy, write_json

SPLITS = ("train", "val", "test")
OPTIONAL = {"factors": np.float32, "poses": np.float32, "object_ids": np.int64}
_RERUN = "re-run `dvc repro prepare` (or `diffrep stage prepare`) to rebuild it"


def quantise(images: np.ndarray) -> np.ndarray:
    """float [0, 1] (N, C, H, W) -> uint8; the clip only absorbs float rounding (validation checks the range).

    NaN has no uint8: it is written as 0 (prepare quantises each chunk as it goes; validation then refuses
    a dataset with NaN pixels before anything is kept).
    """
    with np.errstate(invalid="ignore"):
        return np.rint(np.nan_to_num(np.clip(images, 0.0, 1.0), nan=0.0) * 255.0).astype(np.uint8)


class TestSplitLocked(RuntimeError):
    """The test split was read before the stage finished choosing on val."""


def write_prepared(out: Path, listing: Listing, split: Split, shape: tuple[int, int, int], *, seed: int,
                   test_fraction: float, val_fraction: float, extra: dict | None = None) -> dict:
    """Beside the `{split}_images.npy` the second pass filled (data/chunks.py), write the labels and the
    optional arrays of each split and the manifest into the (temporary) folder `out`; return the manifest."""
    out = Path(out)
    k = len(listing.class_names)
    files, labels = {}, {}
    for name, idx in split.parts().items():
        files[f"{name}_images.npy"] = None
        arrays = {"labels": listing.labels[idx].astype(np.int64)}
        labels[name] = arrays["labels"]
        for field, dtype in OPTIONAL.items():
            value = getattr(listing, field)
            if value is not None:
                arrays[field] = np.asarray(value)[idx].astype(dtype)
        for a, arr in arrays.items():
            save_npy(out / f"{name}_{a}.npy", arr)
            files[f"{name}_{a}.npy"] = None
    files = {f: file_hash(out / f) for f in files}
    manifest = {
        "source": listing.source,
        "image_shape": list(shape),
        "class_names": list(listing.class_names),
        "num_classes": k,
        "counts": {s: int(len(labels[s])) for s in SPLITS},
        "class_counts": {s: np.bincount(labels[s], minlength=k).tolist() for s in SPLITS},
        "factor_names": listing.factor_names,
        "pose_layout": listing.pose_layout,
        "seed": seed,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        **(extra or {}),
        "files": files,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


@dataclass
class Prepared:
    path: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]  # "train_images", "test_labels", "train_poses", ...

    # -- metadata
    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    test_released: bool = False

    def release_test(self) -> None:
        """Every choice is made: from now on the test split may be read (for the reported numbers)."""
        self.test_released = True

    def _key(self, split: str, name: str) -> str:
        if _check_split(split) == "test" and not self.test_released:
            raise TestSplitLocked(
                f"the test split of {self.path} was read before release_test(): choices (probe settings, kNN k, "
                "checkpoints) are made on val; read test only for the reported numbers, after release_test()")
        return f"{split}_{name}"

    # -- arrays
    def images(self, split: str) -> np.ndarray:
        return self.arrays[self._key(split, "images")]  # uint8 (N, C, H, W)

    def labels(self, split: str) -> np.ndarray:
        return self.arrays[self._key(split, "labels")]

    def images_float(self, split: str, device=None, chunk: int = 8192):
        """torch float32 (N, C, H, W) in [-1, 1] (read from the memory map in chunks of rows)."""
        import torch

        from diffrep.train.batches import ImageRows

        rows = ImageRows(self.images(split))
        out = torch.empty(rows.shape, dtype=torch.float32, device=device)
        for i in range(0, len(rows), chunk):
            out[i : i + chunk] = rows[i : i + chunk].to(device)
        return out

    def image_rows(self, split: str):
        """The split's images as a memory-mapped ImageRows: indexing gives float32 rows in [-1, 1]."""
        from diffrep.train.batches import ImageRows

        return ImageRows(self.images(split))

    def array(self, split: str, name: str) -> np.ndarray | None:
        """Any stored array by name ("images", "labels", "factors", "poses", "object_ids"); None if absent."""
        return self.arrays.get(self._key(split, name))


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def load_prepared(path: str | Path = "data/prepared", verify: bool = True) -> Prepared:
    """Load `data/prepared`; `verify` re-hashes every file against the manifest."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise ArtifactError(f"{path}/manifest.json: not found; prepared data is missing: {_RERUN}")
    manifest = read_json(path / "manifest.json")
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}/manifest.json: not a JSON object; {_RERUN}")
    files = manifest.get("files") or {}
    for required in (f"{s}_{a}.npy" for s in SPLITS for a in ("images", "labels")):
        if required not in files:
            raise ArtifactError(f"{path}/manifest.json does not list {required}; {_RERUN}")

    arrays = {}
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in the manifest); {_RERUN}")
        if verify and file_hash(f) != digest:
            raise ArtifactError(
                f"{f}: content changed since `prepare` wrote it (sha256 differs from manifest.json); {_RERUN}"
            )
        arrays[name[: -len(".npy")]] = load_npy(f, mmap=name.endswith("_images.npy"))  # the big ones: mapped

    try:
        _check_shapes(path, manifest, arrays)
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path}/manifest.json: malformed (missing or bad key {e}); {_RERUN}") from e
    return Prepared(path=path, manifest=manifest, arrays=arrays)


def _check_shapes(path: Path, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    shape = tuple(manifest["image_shape"])
    for s in SPLITS:
        n = manifest["counts"][s]
        x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if x.dtype != np.uint8 or x.shape != (n, *shape):
            raise ArtifactError(
                f"{path}/{s}_images.npy: expected uint8 {(n, *shape)}, found {x.dtype} {x.shape}; {_RERUN}"
            )
        if y.dtype != np.int64 or y.shape != (n,):
            raise ArtifactError(f"{path}/{s}_labels.npy: expected int64 ({n},), found {y.dtype} {y.shape}; {_RERUN}")
        for field in OPTIONAL:
            a = arrays.get(f"{s}_{field}")
            if a is not None and len(a) != n:
                raise ArtifactError(f"{path}/{s}_{field}.npy: {len(a)} rows, expected {n}; {_RERUN}")


def group_views(images, poses, object_ids):
    """Rows of single views -> one row per object: (n_obj, V, C, H, W) and (n_obj, V, P), objects in id order.

    In memory, for small sets (scripts); the stages read objects through train.batches.ObjectViews, the same order.
    """
    from diffrep.train.batches import view_index

    index = view_index(object_ids)  # (n_obj, V)
    return images[index.reshape(-1)].unflatten(0, tuple(index.shape)), poses[index]
