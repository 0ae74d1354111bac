"""`soda` stage: train SODA on the prepared data, then measure what its bottleneck z learned.

Writes models/soda/ (weights, resolved config, grid.png: source | reconstruction
[| true target view | synthesised novel view]) and metrics/soda.json
(final loss, img/s, wall time, reconstruction PSNR/SSIM on the test split,
novel-view PSNR/SSIM beside copying the source view when the data has poses,
lineage). z itself is probed, with every other representation, by the
`linear_probe` stage (one protocol, one number per representation).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import Prepared, load_prepared
from diffrep.eval.features import spread
from diffrep.eval.grid import save_grid
from diffrep.eval.soda import soda_views
from diffrep.io import atomic_dir
from diffrep.models.artifact import save_model
from diffrep.models.soda import Soda
from diffrep.stages import runner
from diffrep.train.batches import ObjectViews, view_index

PREPARED = Path("data/prepared")
OUT = Path("models/soda")


def training_data(prep: Prepared) -> tuple[dict[str, torch.Tensor], int]:
    """-> (engine data dict, pose_dim). 2D: rows are images; 3D: rows are objects."""
    poses = prep.array("train", "poses")
    if poses is None:
        return {"images": prep.image_rows("train")}, 0  # memory-mapped: each step reads its rows
    index = view_index(torch.from_numpy(prep.array("train", "object_ids")))  # 3D: a row is an object, (n_obj, V)
    images = ObjectViews(prep.image_rows("train"), index)  # each step reads its objects' views from the file
    return {"images": images, "poses": torch.from_numpy(poses)[index]}, poses.shape[-1]  # poses (n_obj, V, P)


def evaluate(model: Soda, prep: Prepared, cfg: Config, device) -> tuple[dict, torch.Tensor, int]:
    """Reconstructions (and, with poses, novel views) of test images; z is probed by the linear_probe stage."""
    prep.release_test()  # nothing is chosen here: test is read once, for the reported numbers
    test_x = prep.image_rows("test")  # memory-mapped: only the picked rows are read
    poses, ids = (prep.array("test", f) for f in ("poses", "object_ids"))
    poses, ids = (None, None) if poses is None else (torch.from_numpy(poses), torch.from_numpy(ids))
    n = cfg.soda.eval_images
    pick = spread(len(test_x), n) if poses is None else torch.arange(n)  # 2D: every class; 3D: the first n objects
    return soda_views(model, test_x, poses, ids, pick, generator=torch.Generator().manual_seed(cfg.seed),
                      steps=None, device=device)


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("soda", cfg, root) as ctx:
        prep = load_prepared(ctx.path(PREPARED))
        data, pose_dim = training_data(prep)
        model = Soda(cfg.soda, prep.image_shape, pose_dim=pose_dim)
        params = runner.section_params(cfg, "soda", *runner.ONLINE_PARAMS)
        inputs = [ctx.path(PREPARED)]

        def sample_fn(ema: Soda) -> torch.Tensor:  # TensorBoard: reconstructions of 8 fixed val images
            x = prep.image_rows("val")[:8].to(ctx.runtime.device)
            p = prep.array("val", "poses")
            pose = torch.from_numpy(p[:8]).to(x.device) if p is not None else None
            return torch.cat([x, ema.decode(ema.encode(x), pose, steps=20)])

        online = runner.online_eval(ctx, prep, "soda", cfg.soda.train)  # val kNN of z during training
        result, ckpt_dir = runner.train(ctx, model, cfg.soda.train, data, params=params, inputs=inputs,
                                        sample_fn=sample_fn, online=online)
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
