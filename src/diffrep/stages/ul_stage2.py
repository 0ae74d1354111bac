"""`ul_stage2` stage: a larger base model on the frozen stage-1 latents (models/ul.py `UlBase`).

Reads models/ul_stage1 (encoder and decoder stay frozen: the training set is
encoded once into clean latents) and writes models/ul_stage2/ (EMA weights,
resolved config, samples.png: base model -> z0 at logsnr_z0 -> stage-1
decoder) and metrics/ul_stage2.json (final and held-out loss, latents/s,
wall time, lineage).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import load_prepared
from diffrep.eval.features import batched
from diffrep.eval.grid import save_grid
from diffrep.io import atomic_dir
from diffrep.models.artifact import load_model, save_model
from diffrep.models.ul import UlBase, UnifiedLatents, generate
from diffrep.stages import runner
from diffrep.train.rng import BatchRNG

PREPARED = Path("data/prepared")
STAGE1 = Path("models/ul_stage1")
OUT = Path("models/ul_stage2")


@torch.no_grad()
def held_out_loss(base: UlBase, latents: torch.Tensor, seed: int, device, batch_size: int = 500) -> float:
    total = 0.0
    for i in range(0, len(latents), batch_size):
        z = latents[i:i + batch_size].to(device)
        total += float(base({"latents": z}, BatchRNG(seed, i, len(z), device=device))[0]) * len(z)
    return total / len(latents)


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("ul_stage2", cfg, root) as ctx:
        s = cfg.ul.stage2
        dev = ctx.runtime.device
        prep = load_prepared(ctx.path(PREPARED))
        stage1: UnifiedLatents = load_model(ctx.path(STAGE1), "ul_stage1").to(dev).requires_grad_(False)
        latents = batched(stage1.encode, prep.image_rows("train"), device=dev)  # (N, C_z, s, s), frozen
        val_latents = batched(stage1.encode, prep.image_rows("val"), device=dev)
        base = UlBase(s, stage1.latent_shape, stage1.cfg.logsnr_z0)
        params = runner.section_params(cfg, "ul.stage2")
        inputs = [ctx.path(STAGE1), ctx.path(PREPARED)]

        def sample_fn(ema: UlBase) -> torch.Tensor:  # TensorBoard: 16 generated images, fixed seed
            return generate(stage1, ema, 16, seed=cfg.seed, device=dev)

        result, ckpt_dir = runner.train(ctx, base, s.train, {"latents": latents}, params=params, inputs=inputs,
                                        sample_fn=sample_fn)
        if not ctx.is_main:
            return None
        ema = result.ema
        samples = generate(stage1, ema, s.sample_images, seed=cfg.seed, device=dev)
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_model(tmp, ema, kind="ul_stage2", section=to_dict(s), image_shape=stage1.latent_shape,
                       extra={"logsnr_z0": stage1.cfg.logsnr_z0}, full_config=to_dict(cfg))
            save_grid(tmp / "samples.png", samples, ncol=8)
        metrics = runner.training_metrics(result, rate_key="latents_per_s") | {
            "val_loss": held_out_loss(ema, val_latents, cfg.seed, dev),
            "latent_shape": list(stage1.latent_shape), "logsnr_z0": stage1.cfg.logsnr_z0,
        }
        return runner.finish_training(ctx, metrics, params=params, inputs=inputs, out_dir=OUT, ckpt_dir=ckpt_dir)
