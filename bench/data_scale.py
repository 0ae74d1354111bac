"""Data larger than memory: peak RSS of `prepare` and of a training stage at two dataset sizes, and memory-mapped
vs in-memory img/s.

    python -m bench.data_scale rss --sizes 20000 200000       # -> bench/results/data_scale_rss.json ("rows")
    python -m bench.data_scale rss --stage soda3d             # -> the same file ("soda3d"): 3D SODA training
    python -m bench.data_scale prepare-rss --sizes 20000 200000   # -> the same file ("prepare")
    python -m bench.data_scale speed --prepared data/prepared   # -> bench/results/data_scale_speed.json

rss: writes a synthetic prepared folder of N random uint8 images (chunk by chunk, never whole in memory, hashed
like `prepare` does), then runs the real `feature_net` stage on it in a fresh interpreter under
bench/peak_rss.py: load_prepared (sha256 of every file), training from the memory-mapped split, accuracy over
train/val/test in batches, model written. Flat peak RSS across N means no split is held whole.
prepare-rss: writes an image folder of N random 16x16 greyscale PNGs (10 classes) under a temporary folder, then
runs the real `prepare` stage on it (`diffrep stage prepare`, data.workers 1 and 2, data.chunk_size 2048) under
bench/peak_rss.py: peak RSS (of the largest process: the stage or one of its workers) and wall time per run, and
prepare's own seconds per pass. Flat peak RSS across N means no pass holds the dataset.
speed: one process, the soda model of params.yaml, Trainer.train_step on the same prepared train split held as
an in-memory float tensor (A) or as the memory-mapped ImageRows (B), A and B alternated in blocks, medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffrep.io import file_hash, write_json

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 16, 16)  # (C, H, W)
CLASSES = 10
TINY = {"seed": 0, "data": {"source": "digits", "image_size": SHAPE[-1]}, "runtime": {"device": "cpu", "num_threads": 1},
        "feature_net": {"width": 8, "train": {"steps": 30, "batch_size": 64, "ckpt_every": 1000, "log_every": 10}},
        "eval": {"batch_size": 500}}


def write_synthetic(out: Path, n: int, chunk: int = 10_000, views: int = 0) -> None:
    """A prepared folder (train/val/test = 70/10/20%) written chunk by chunk through np.lib.format.open_memmap.

    views > 0: 3D data, `views` rows per object (object ids and random poses (sin az, cos az, elevation))."""
    out.mkdir(parents=True)
    counts = {"train": n * 7 // 10, "val": n // 10}
    counts["test"] = n - counts["train"] - counts["val"]
    if views:  # whole objects in every split
        counts = {k: m - m % views for k, m in counts.items()}
    files, g = {}, np.random.default_rng(0)
    for split, m in counts.items():
        x = np.lib.format.open_memmap(out / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(m, *SHAPE))
        for i in range(0, m, chunk):
            x[i : i + chunk] = g.integers(0, 256, (min(chunk, m - i), *SHAPE), dtype=np.uint8)
        x.flush()
        del x
        np.save(out / f"{split}_labels.npy", np.arange(m, dtype=np.int64) % CLASSES)
        names = [f"{split}_images.npy", f"{split}_labels.npy"]
        if views:
            az = g.uniform(-1.2, 1.2, m)
            np.save(out / f"{split}_poses.npy", np.stack([np.sin(az), np.cos(az), g.uniform(0.1, 0.6, m)], 1)
                    .astype(np.float32))
            np.save(out / f"{split}_object_ids.npy", np.arange(m, dtype=np.int64) // views)
            names += [f"{split}_poses.npy", f"{split}_object_ids.npy"]
        for name in names:
            files[name] = file_hash(out / name)
    write_json(out / "manifest.json", {
        "source": "digits", "image_shape": list(SHAPE), "class_names": [str(k) for k in range(CLASSES)],
        "num_classes": CLASSES, "counts": counts, "seed": 0, "files": files,
        "pose_layout": ["sin_azimuth", "cos_azimuth", "elevation"] if views else None,
        "class_counts": {s: np.bincount(np.arange(m) % CLASSES, minlength=CLASSES).tolist() for s, m in counts.items()}})


NET = {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [], "groups": 4, "heads": 1}
SODA3D = {"seed": 0, "data": {"source": "shapes", "image_size": SHAPE[-1]}, "runtime": {"device": "cpu", "num_threads": 1},
          "soda": {"z_dim": 6, "encoder": {"width": 8, "stages": 2}, "unet": NET, "diffusion": {"sample_steps": 2},
                   "eval_images": 8, "train": {"steps": 30, "batch_size": 16, "ckpt_every": 1000, "log_every": 10}}}
VIEWS = 5


def stage_child(root: str, in_memory: bool, stage: str = "feature_net") -> None:
    import torch

    from diffrep.config import parse_config
    from diffrep.data.prepared import Prepared, group_views
    from diffrep.stages import feature_net, soda

    if in_memory:  # the control: the stage as it was, every split a float tensor (the measurement must see it)
        Prepared.image_rows = Prepared.images_float

        def grouped(prep):  # 3D SODA before ObjectViews: the whole train split as floats, regrouped by object
            ids, poses = (torch.from_numpy(prep.array("train", f)) for f in ("object_ids", "poses"))
            images, poses = group_views(prep.images_float("train"), poses, ids)
            return {"images": images, "poses": poses}, poses.shape[-1]

        soda.training_data = grouped
    if stage == "soda3d":
        soda.run(parse_config(SODA3D), Path(root))
    else:
        feature_net.run(parse_config(TINY), Path(root))


def rss(sizes: list[int], out: Path, stage: str = "feature_net") -> dict:
    """Peak RSS of `stage` (feature_net, or soda3d: 3D SODA on objects of VIEWS views) at each size."""
    views = VIEWS if stage == "soda3d" else 0
    rows = []
    for n, mode in ((n, m) for n in sizes for m in ("memory_mapped", "in_memory_control")):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_synthetic(root / "data/prepared", n, views=views)
            kib = root / "rss.txt"
            t = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "bench/peak_rss.py"), str(kib), sys.executable, "-m",
                            "bench.data_scale", "stage-child", str(root), "--stage", stage]
                           + (["--in-memory"] if mode != "memory_mapped" else []), check=True, cwd=ROOT)
            metrics = json.loads((root / f"metrics/{'soda' if views else 'feature_net'}.json").read_text())
            rows.append({"n_images": n, "data": mode, "prepared_mib": round(sum(f.stat().st_size for f in
                                                                 (root / "data/prepared").iterdir()) / 2**20, 1),
                         "peak_rss_mib": round(int(kib.read_text()) / 1024, 1), "wall_s": round(time.perf_counter() - t, 1),
                         **({"stage_final_loss": metrics["final_loss"]} if views else
                            {"stage_val_accuracy": metrics["val_accuracy"]})})
            print(rows[-1], flush=True)
    peak = {m: [r["peak_rss_mib"] for r in rows if r["data"] == m] for m in ("memory_mapped", "in_memory_control")}
    ratio = peak["memory_mapped"][-1] / peak["memory_mapped"][0]
    what = ("peak RSS of the feature_net stage (load_prepared with sha256 verification, training from the "
            "memory-mapped split, batched accuracy on every split, model written)") if not views else (
            f"peak RSS of the soda stage on 3D data ({VIEWS} views per object: ObjectViews training, reconstructions "
            "and novel views of the first test objects, model written); control: the train split as floats, "
            "regrouped by object (group_views), as before")
    res = {"what": what, "image_shape": list(SHAPE), "rows": rows, "rss_ratio_largest_to_smallest": round(ratio, 3),
           "control_ratio_largest_to_smallest": round(peak["in_memory_control"][-1] / peak["in_memory_control"][0], 3),
           "flat_within_10pct": ratio <= 1.10, "note": "measured under contention (shared 2-core machine)"}
    doc = json.loads(out.read_text()) if out.is_file() else {}
    if views:
        doc["soda3d"] = res  # beside the feature_net and prepare numbers, which stay
    else:
        doc = res | {k: doc[k] for k in ("prepare", "soda3d") if k in doc}  # the other sections' numbers stay
    write_json(out, doc)
    return res


def write_pngs(folder: Path, n: int, size: int = 16) -> None:
    """n random greyscale PNGs, class k = image index % CLASSES, in folder/<k>/<index>.png."""
    from PIL import Image

    g = np.random.default_rng(0)
    for k in range(CLASSES):
        (folder / str(k)).mkdir(parents=True)
    for i in range(0, n, 1000):
        block = g.integers(0, 256, (min(1000, n - i), size, size), dtype=np.uint8)
        for j, a in enumerate(block):
            Image.fromarray(a, "L").save(folder / str((i + j) % CLASSES) / f"{i + j:07d}.png")


def prepare_rss(sizes: list[int], out: Path, workers: list[int], chunk: int = 2048) -> dict:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            t = time.perf_counter()
            write_pngs(root / "data/raw/imgs", n)
            print(f"{n} PNGs written in {time.perf_counter() - t:.0f}s", flush=True)
            for w in workers:
                (root / "params.yaml").write_text(json.dumps({"seed": 0, "data": {
                    "source": "imagefolder", "path": "data/raw/imgs", "image_size": 16, "workers": w,
                    "chunk_size": chunk}}))
                kib = root / "rss.txt"
                t = time.perf_counter()
                subprocess.run([sys.executable, str(ROOT / "bench/peak_rss.py"), str(kib), sys.executable, "-m",
                                "diffrep.cli", "stage", "prepare", "--params", str(root / "params.yaml"),
                                "--root", str(root)], check=True, cwd=ROOT)
                m = json.loads((root / "metrics/prepare.json").read_text())
                rows.append({"n_images": n, "workers": w, "chunk_size": chunk,
                             "peak_rss_mib": round(int(kib.read_text()) / 1024, 1),
                             "wall_s": round(time.perf_counter() - t, 1), "stage_seconds": m["seconds"],
                             "counts": m["counts"]})
                print(rows[-1], flush=True)
    peak = {w: [r["peak_rss_mib"] for r in rows if r["workers"] == w] for w in workers}
    res = {"what": "peak RSS and wall time of the prepare stage on an image folder of 16x16 greyscale PNGs "
                   "(listing, split, chunked decode into memory-mapped files, per-chunk statistics, GX once)",
           "rows": rows,
           "rss_ratio_largest_to_smallest": {str(w): round(p[-1] / p[0], 3) for w, p in peak.items()},
           "flat_within_10pct": all(p[-1] / p[0] <= 1.10 for p in peak.values()),
           "note": "measured under contention (shared 2-core machine)"}
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc["prepare"] = res  # beside the training stage's numbers, which stay
    write_json(out, doc)
    return res


def speed(prepared: Path, out: Path, blocks: int = 6, steps: int = 10) -> dict:
    import torch

    from bench.models import build
    from diffrep.config import RuntimeConfig, load_config
    from diffrep.data.prepared import load_prepared
    from diffrep.runtime import resolve_runtime
    from diffrep.train import Trainer

    cfg, rt = load_config(ROOT / "params.yaml"), resolve_runtime(RuntimeConfig(device="cpu"))
    prep = load_prepared(prepared)
    variants = {"in_memory": {"images": prep.images_float("train")}, "memory_mapped": {"images": prep.image_rows("train")}}
    trainers = {}
    for name, data in variants.items():
        spec = build("soda", cfg, prep.image_shape)
        trainers[name] = Trainer(spec.model, spec.train_cfg, rt, data, seed=0, ckpt_dir=Path(tempfile.mkdtemp()),
                                 fingerprint="bench", run_name=name, progress=False)
        trainers[name].model.train()
        for i in range(2):  # warm-up
            trainers[name].train_step(i)
    times = {k: [] for k in trainers}
    for b in range(blocks):
        for name in (list(trainers) if b % 2 == 0 else list(trainers)[::-1]):  # ABBA: neither always goes first
            t = time.perf_counter()
            for i in range(steps):
                trainers[name].train_step(2 + b * steps + i)
            times[name].append((time.perf_counter() - t) / steps)
    bs = cfg.soda.train.batch_size
    ips = {k: bs / statistics.median(v) for k, v in times.items()}
    res = {"what": f"soda Trainer.train_step img/s on {prepared} train ({prep.manifest['counts']['train']} images), "
                   f"batch {bs}, {blocks} interleaved blocks of {steps} steps, medians",
           "img_per_s": {k: round(v, 1) for k, v in ips.items()},
           "memory_mapped_over_in_memory": round(ips["memory_mapped"] / ips["in_memory"], 3),
           "step_s_per_block": times, "torch_threads": torch.get_num_threads(),
           "note": "measured under contention (shared 2-core machine)"}
    write_json(out, res)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data_scale")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    r.add_argument("--out", type=Path, default=ROOT / "bench/results/data_scale_rss.json")
    r.add_argument("--stage", choices=["feature_net", "soda3d"], default="feature_net")
    q = sub.add_parser("prepare-rss")
    q.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    q.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    q.add_argument("--out", type=Path, default=ROOT / "bench/results/data_scale_rss.json")
    s = sub.add_parser("speed")
    s.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    s.add_argument("--out", type=Path, default=ROOT / "bench/results/data_scale_speed.json")
    c = sub.add_parser("stage-child")
    c.add_argument("root")
    c.add_argument("--in-memory", action="store_true")
    c.add_argument("--stage", choices=["feature_net", "soda3d"], default="feature_net")
    a = p.parse_args(argv)
    if a.cmd == "stage-child":
        stage_child(a.root, a.in_memory, a.stage)
    elif a.cmd == "prepare-rss":
        print(json.dumps(prepare_rss(a.sizes, a.out, a.workers), indent=1))
    elif a.cmd == "rss":
        print(json.dumps(rss(a.sizes, a.out, a.stage), indent=1))
    else:
        print(json.dumps(speed(a.prepared, a.out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
