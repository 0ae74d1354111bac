"""The quality numbers beside the speed numbers, so speed is never bought with quality silently.

Read from a metrics folder (the repo's committed metrics/, or a fresh clone's
after `--pipeline`); each file is labelled with the commit its lineage block
names, since the metrics of a folder may come from different runs.
"""
from __future__ import annotations

import json
from pathlib import Path

# file -> the headline keys worth tracking ("probe_*" expands to every representation)
KEYS = {
    "soda": ["recon_psnr", "recon_ssim", "images_per_s", "train_s", "wall_s"],
    "ul_stage1": ["bits_per_pixel", "recon_psnr", "recon_ssim", "images_per_s", "train_s", "wall_s"],
    "ul_stage2": ["val_loss", "latents_per_s", "train_s", "wall_s"],
    "ldae": ["images_per_s", "train_s", "wall_s"],
    "feature_net": ["test_accuracy", "wall_s"],
    "linear_probe": ["probe_*", "knn_*", "wall_s"],
    "generation_eval": ["fd_featnet", "fd_featnet_floor", "fd_featnet_floor_train", "fd_featnet_ratio", "kid_featnet",
                        "fd_featnet_ul_recon_ratio", "wall_s"],
}


def _pick(metrics: dict, keys: list[str]) -> dict:
    out = {}
    for k in keys:
        if k.endswith("*"):
            out |= {m: v for m, v in metrics.items()
                    if m.startswith(k[:-1]) and isinstance(v, (int, float))}
        elif k in metrics:
            out[k] = metrics[k]
    return out


def read_quality(metrics_dir: Path, label: str | None = None) -> dict:
    """-> {"source", "files": {stage: {commit, dirty, finished, values}}, "missing": [stage, ...]}."""
    files, missing = {}, []
    for stage, keys in KEYS.items():
        path = metrics_dir / f"{stage}.json"
        if not path.is_file():
            missing.append(stage)
            continue
        m = json.loads(path.read_text())
        lin = m.get("lineage", {})
        files[stage] = {"commit": lin.get("git", {}).get("commit"), "dirty": lin.get("git", {}).get("dirty"),
                        "finished": lin.get("finished"), "device": lin.get("device"),
                        "threads": lin.get("torch_threads"), "values": _pick(m, keys)}
    return {"source": label or str(metrics_dir), "files": files, "missing": missing}
