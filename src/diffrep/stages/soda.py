"""`soda` stage: train SODA on the prepared data, then measure what its bottleneck z learned.

Writes models/soda/ (weights, resolved config, grid.png: source | reconstruction
[| true target view | synthesised novel view]) and metrics/soda.json
(final loss, img/s, wall time, reconstruction PSNR/SSIM on the test split,
kNN and linear-probe accuracy on z beside the raw-pixel kNN at the same
resolution, novel-view PSNR/SSIM when the data has poses, lineage).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import Prepared, group_views, load_prepared
from diffrep.eval.features import batched, spread
from diffrep.eval.grid import save_grid
from diffrep.eval.probe import knn_accuracy, linear_probe
from diffrep.eval.soda import soda_views
from diffrep.io import atomic_dir
from diffrep.models.artifact import save_model
from diffrep.models.soda import Soda
from diffrep.stages import runner

PREPARED = Path("data/prepared")
OUT = Path("models/soda")


def training_data(prep: Prepared) -> tuple[dict[str, torch.Tensor], int]:
    """-> (engine data dict, pose_dim). 2D: rows are images; 3D: rows are objects."""
    x = prep.images_float("train")
    poses = prep.array("train", "poses")
    if poses is None:
        return {"images": x}, 0
    images, poses = group_views(x, torch.from_numpy(poses), torch.from_numpy(prep.array("train", "object_ids")))
    return {"images": images, "poses": poses}, poses.shape[-1]


def evaluate(model: Soda, prep: Prepared, cfg: Config, device) -> tuple[dict, torch.Tensor, int]:
    """Probe accuracies on z, reconstruction (and novel-view) quality; returns metrics, grid, grid columns."""
    train_x, test_x = prep.images_float("train"), prep.images_float("test")
    train_y, test_y = torch.from_numpy(prep.labels("train")), torch.from_numpy(prep.labels("test"))
    k = prep.num_classes
    z_train = batched(model.encode, train_x, device=device)
    z_test = batched(model.encode, test_x, device=device)
    m = {
        "knn_z": knn_accuracy(z_train, train_y, z_test, test_y, k),
        "linear_probe_z": linear_probe(z_train, train_y, z_test, test_y, k, seed=cfg.seed),
        "knn_raw_pixels": knn_accuracy(train_x.flatten(1), train_y, test_x.flatten(1), test_y, k),
    }
    poses, ids = (prep.array("test", f) for f in ("poses", "object_ids"))
    poses, ids = (None, None) if poses is None else (torch.from_numpy(poses), torch.from_numpy(ids))
    n = cfg.soda.eval_images
    pick = spread(len(test_x), n) if poses is None else torch.arange(n)  # 2D: every class; 3D: the first n objects
    views, grid, ncol = soda_views(model, test_x, poses, ids, pick, generator=torch.Generator().manual_seed(cfg.seed),
                                   steps=None, device=device)
    return m | views, grid, ncol


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("soda", cfg, root) as ctx:
        prep = load_prepared(ctx.path(PREPARED))
        data, pose_dim = training_data(prep)
        model = Soda(cfg.soda, prep.image_shape, pose_dim=pose_dim)
        params = runner.section_params(cfg, "soda")
        inputs = [ctx.path(PREPARED)]

        def sample_fn(ema: Soda) -> torch.Tensor:  # TensorBoard: reconstructions of 8 fixed test images
            x = prep.images_float("test")[:8].to(ctx.runtime.device)
            p = prep.array("test", "poses")
            pose = torch.from_numpy(p[:8]).to(x.device) if p is not None else None
            return torch.cat([x, ema.decode(ema.encode(x), pose, steps=20)])

        result, ckpt_dir = runner.train(ctx, model, cfg.soda.train, data, params=params, inputs=inputs,
                                        sample_fn=sample_fn)
        if not ctx.is_main:
            return None
        ema = result.ema
        metrics, grid, ncol = evaluate(ema, prep, cfg, ctx.runtime.device)
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_model(tmp, ema, kind="soda", section=to_dict(cfg.soda), image_shape=prep.image_shape,
                       extra={"pose_dim": pose_dim}, full_config=to_dict(cfg))
            save_grid(tmp / "grid.png", grid, ncol=ncol)
        metrics = runner.training_metrics(result) | metrics
        return runner.finish_training(ctx, metrics, params=params, inputs=inputs, out_dir=OUT, ckpt_dir=ckpt_dir)
