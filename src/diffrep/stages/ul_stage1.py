"""`ul_stage1` stage: train the Unified Latents encoder, latent prior and decoder jointly (models/ul.py).

Writes models/ul_stage1/ (EMA weights, resolved config, recon.png: rows of
(test image, reconstruction) pairs) and metrics/ul_stage1.json: the latent's
bitrate on the test split (bits/px from the prior's ELBO, 8 stratified times
per image), reconstruction PSNR/SSIM (encode -> z0 -> decoder DDIM from pure
noise), the held-out loss terms, img/s, wall time and the lineage block.
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import load_prepared
from diffrep.eval.features import batched, spread
from diffrep.eval.grid import interleave, save_grid
from diffrep.eval.recon import mean_with_ci
from diffrep.eval.ul import held_out_terms, reconstruction
from diffrep.io import atomic_dir
from diffrep.models.artifact import save_model
from diffrep.models.ul import UnifiedLatents
from diffrep.stages import runner

PREPARED = Path("data/prepared")
OUT = Path("models/ul_stage1")


def evaluate(model: UnifiedLatents, x: torch.Tensor, seed: int, device) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bpp = batched(lambda b: model.bits_per_pixel(b, generator=g), x, device=device)  # (N,)
    recon, rec = reconstruction(model, x, generator=g, device=device)
    z = batched(model.encode, x, device=device)
    m = {
        **mean_with_ci(bpp, "bits_per_pixel", seed),  # bootstrap interval over the test images
        "bits_per_image": bpp.mean().item() * model.pixels,
        **recon,
        "latent_shape": list(model.latent_shape),
        "latent_std": z.std().item(),
        **held_out_terms(model, x, seed, device),
    }
    show = spread(len(x), 32)
    return m, interleave(x[show], rec[show])


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("ul_stage1", cfg, root) as ctx:
        s = cfg.ul.stage1
        prep = load_prepared(ctx.path(PREPARED))
        data = {"images": prep.image_rows("train")}  # memory-mapped: each step reads its rows
        model = UnifiedLatents(s, prep.image_shape)
        params = runner.section_params(cfg, "ul.stage1", *runner.ONLINE_PARAMS)
        inputs = [ctx.path(PREPARED)]
        val_x = prep.image_rows("val")
        fixed = val_x[spread(len(val_x), 8)]

        def sample_fn(ema: UnifiedLatents) -> torch.Tensor:  # TensorBoard: 8 val images and their reconstructions
            x = fixed.to(ctx.runtime.device)
            return torch.cat([x, ema.reconstruct(x, steps=16, generator=torch.Generator().manual_seed(0))])

        online = runner.online_eval(ctx, prep, "ul_stage1", s.train)  # val kNN of the latents during training
        result, ckpt_dir = runner.train(ctx, model, s.train, data, params=params, inputs=inputs, sample_fn=sample_fn,
                                        online=online)
        if not ctx.is_main:
            return None
        ema = result.ema
        prep.release_test()  # nothing is chosen here: test is read once, for the reported numbers
        test_all = prep.image_rows("test")
        test_x = test_all[spread(len(test_all), s.eval_images)]
        metrics, grid = evaluate(ema, test_x, cfg.seed, ctx.runtime.device)
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_model(tmp, ema, kind="ul_stage1", section=to_dict(s), image_shape=prep.image_shape,
                       full_config=to_dict(cfg))
            save_grid(tmp / "recon.png", grid, ncol=8)  # 4 (image, reconstruction) pairs per row
        metrics = runner.training_metrics(result) | {"loss_factor": s.loss_factor, "logsnr_z0": s.logsnr_z0,
                                                     **metrics, "last_terms": result.last_terms}
        return runner.finish_training(ctx, metrics, params=params, inputs=inputs, out_dir=OUT, ckpt_dir=ckpt_dir)
