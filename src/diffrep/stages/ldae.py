"""`ldae` stage: fit the patch-PCA tokenizer, train l-DAE on the prepared data.

Writes models/ldae/ (weights with the fitted tokenizer as buffers, resolved config,
grid.png: noisy input | prediction | clean, one validation image per row, noise
rising down the rows) and metrics/ldae.json (final loss, img/s, wall time, lineage).
Its encoder tokens are probed, with every other representation and the untrained
network, by the `linear_probe` stage (one protocol, one number per representation).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import load_prepared
from diffrep.eval.grid import interleave, save_grid
from diffrep.io import atomic_dir
from diffrep.models.artifact import save_model
from diffrep.models.ldae import Ldae
from diffrep.nn import set_attention_backend
from diffrep.stages import runner

PREPARED = Path("data/prepared")
OUT = Path("models/ldae")
GRID_ROWS = 12


@torch.no_grad()
def grid_images(model: Ldae, x: torch.Tensor, seed: int) -> torch.Tensor:
    """noisy | prediction | clean for each image of x, sigma rising linearly to sigma_max down the rows."""
    sigma = model.cfg.sigma_max * torch.linspace(1, len(x), len(x), device=x.device) / len(x)  # (n,)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
    return interleave(*model.denoise(x, sigma, eps), x)


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("ldae", cfg, root) as ctx:
        prep = load_prepared(ctx.path(PREPARED))
        train_x, val_x = prep.image_rows("train"), prep.image_rows("val")  # memory-mapped (N, C, H, W) in [-1, 1]
        model = Ldae(cfg.ldae, prep.image_shape)
        model.fit_tokenizer(train_x, seed=cfg.seed)  # deterministic: every DDP rank fits the same PCA
        set_attention_backend(model, ctx.runtime.attention)
        params = runner.section_params(cfg, "ldae", *runner.ONLINE_PARAMS)
        inputs = [ctx.path(PREPARED)]

        def sample_fn(ema: Ldae) -> torch.Tensor:  # TensorBoard: 8 noisy val inputs, then their predictions
            g = grid_images(ema, val_x[:8].to(ctx.runtime.device), cfg.seed)
            return torch.cat([g[0::3], g[1::3]])

        online = runner.online_eval(ctx, prep, "ldae", cfg.ldae.train)  # val kNN of the pooled tokens in training
        result, ckpt_dir = runner.train(ctx, model, cfg.ldae.train, {"images": train_x}, params=params,
                                        inputs=inputs, sample_fn=sample_fn, online=online)
        if not ctx.is_main:
            return None
        ema = result.ema
        grid = grid_images(ema, val_x[:GRID_ROWS].to(ctx.runtime.device), cfg.seed)
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_model(tmp, ema, kind="ldae", section=to_dict(cfg.ldae), image_shape=prep.image_shape,
                       full_config=to_dict(cfg))
            save_grid(tmp / "grid.png", grid, ncol=3)
        metrics = runner.training_metrics(result) | {"feature_pool": cfg.ldae.feature_pool}
        return runner.finish_training(ctx, metrics, params=params, inputs=inputs, out_dir=OUT, ckpt_dir=ckpt_dir)
