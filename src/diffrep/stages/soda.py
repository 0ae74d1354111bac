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
from diffrep.data.prepared import Prepared, load_prepared
from diffrep.eval.features import batched
from diffrep.eval.grid import interleave, save_grid
from diffrep.eval.probe import knn_accuracy, linear_probe
from diffrep.eval.recon import psnr, ssim
from diffrep.io import atomic_dir
from diffrep.models.artifact import save_model
from diffrep.models.soda import Soda
from diffrep.stages import runner

PREPARED = Path("data/prepared")
OUT = Path("models/soda")


def group_views(images: torch.Tensor, poses: torch.Tensor, object_ids: torch.Tensor):
    """Rows of single views -> one row per object: (n_obj, V, C, H, W) and (n_obj, V, P)."""
    order = torch.argsort(object_ids, stable=True)
    ids, counts = torch.unique_consecutive(object_ids[order], return_counts=True)
    if counts.min() != counts.max():
        raise ValueError(f"shapes data: objects have between {counts.min()} and {counts.max()} views; "
                         "SODA's 3D views need the same number of views per object (re-run prepare)")
    V = int(counts[0])
    if V < 2:
        raise ValueError("shapes data: every object needs at least 2 views for novel-view training")
    return images[order].unflatten(0, (len(ids), V)), poses[order].unflatten(0, (len(ids), V))


def training_data(prep: Prepared) -> tuple[dict[str, torch.Tensor], int]:
    """-> (engine data dict, pose_dim). 2D: rows are images; 3D: rows are objects."""
    x = prep.images_float("train")
    poses = prep.array("train", "poses")
    if poses is None:
        return {"images": x}, 0
    images, poses = group_views(x, torch.from_numpy(poses), torch.from_numpy(prep.array("train", "object_ids")))
    return {"images": images, "poses": poses}, poses.shape[-1]


def evaluate(model: Soda, prep: Prepared, cfg: Config, device) -> tuple[dict, torch.Tensor]:
    """Probe accuracies on z, reconstruction (and novel-view) quality; returns metrics and the grid."""
    s = cfg.soda
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
    g = torch.Generator().manual_seed(cfg.seed)
    poses = prep.array("test", "poses")
    if poses is None:
        n = min(s.eval_images, len(test_x))
        src = test_x[torch.linspace(0, len(test_x) - 1, n).long()]  # every class, not the first n
        rec = batched(lambda x: model.reconstruct(x, generator=g), src, device=device)
        m |= {"recon_psnr": psnr(rec, src), "recon_ssim": ssim(rec, src)}
        show = torch.linspace(0, n - 1, min(16, n)).long()  # spread over the class-sorted split
        return m, interleave(src[show], rec[show])
    # 3D: reconstruct the source view; synthesise another view of the same object from its pose
    images, poses = group_views(test_x, torch.from_numpy(poses), torch.from_numpy(prep.array("test", "object_ids")))
    n = min(s.eval_images, len(images))
    src, tgt, tgt_pose = images[:n, 0], images[:n, 1], poses[:n, 1]
    src_pose = poses[:n, 0]
    rec = batched(lambda x, p: model.decode(model.encode(x), p, generator=g), src, src_pose, device=device)
    nv = batched(lambda x, p: model.novel_view(x, p, generator=g), src, tgt_pose, device=device)
    m |= {"recon_psnr": psnr(rec, src), "recon_ssim": ssim(rec, src),
          "novel_view_psnr": psnr(nv, tgt), "novel_view_ssim": ssim(nv, tgt)}
    show = torch.linspace(0, n - 1, min(12, n)).long()
    return m, interleave(src[show], rec[show], tgt[show], nv[show])


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
        metrics, grid = evaluate(ema, prep, cfg, ctx.runtime.device)
        ncol = 4 if pose_dim else 2
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_model(tmp, ema, kind="soda", section=to_dict(cfg.soda), image_shape=prep.image_shape,
                       extra={"pose_dim": pose_dim}, full_config=to_dict(cfg))
            save_grid(tmp / "grid.png", grid, ncol=ncol)
        metrics = runner.training_metrics(result) | metrics
        return runner.finish_training(ctx, metrics, params=params, inputs=inputs, out_dir=OUT, ckpt_dir=ckpt_dir)
