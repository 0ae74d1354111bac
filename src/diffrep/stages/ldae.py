"""`ldae` stage: fit the patch-PCA tokenizer, train l-DAE on the prepared data, probe its encoder.

Writes models/ldae/ (weights with the fitted tokenizer as buffers, resolved config,
grid.png: noisy input | prediction | clean, one test image per row, noise rising
down the rows) and metrics/ldae.json: final loss, img/s, wall time, and on the
test split kNN and linear-probe accuracy of the encoder tokens (pooled as
`ldae.feature_pool` says; kNN of both poolings), beside the
same two on raw pixels at the same resolution (with an exact McNemar test of the two kNNs
on the same test images) and the kNN of a random-init
(untrained) network on the same tokenizer; the three kNNs again after centring and after
standardising each representation (`knn_by_normalization`), all computed in this run; plus lineage.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import load_prepared
from diffrep.eval.features import batched
from diffrep.eval.grid import interleave, save_grid
from diffrep.eval.paired import mcnemar_exact
from diffrep.eval.probe import KNN_NORMALIZATIONS, accuracy, knn_correct, linear_probe, normalize_for_knn
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
        train_x = prep.images_float("train")  # (N, C, H, W) in [-1, 1]
        model = Ldae(cfg.ldae, prep.image_shape)
        model.fit_tokenizer(train_x, seed=cfg.seed)  # deterministic: every DDP rank fits the same PCA
        set_attention_backend(model, ctx.runtime.attention)
        random_init = copy.deepcopy(model).eval()  # the honest baseline: same tokenizer and init, no training
        params = runner.section_params(cfg, "ldae")
        inputs = [ctx.path(PREPARED)]
        test_x = prep.images_float("test")

        def sample_fn(ema: Ldae) -> torch.Tensor:  # TensorBoard: 8 noisy inputs, then their predictions
            g = grid_images(ema, test_x[:8].to(ctx.runtime.device), cfg.seed)
            return torch.cat([g[0::3], g[1::3]])

        result, ckpt_dir = runner.train(ctx, model, cfg.ldae.train, {"images": train_x}, params=params,
                                        inputs=inputs, sample_fn=sample_fn)
        if not ctx.is_main:
            return None
        ema, dev = result.ema, ctx.runtime.device
        train_y, test_y = torch.from_numpy(prep.labels("train")), torch.from_numpy(prep.labels("test"))
        k = prep.num_classes
        t_train, t_test = batched(ema.encoder_tokens, train_x, device=dev), batched(ema.encoder_tokens, test_x, device=dev)
        random_init.to(dev)
        r_train, r_test = batched(random_init.features, train_x, device=dev), batched(random_init.features, test_x, device=dev)
        pool = cfg.ldae.feature_pool
        f_train, f_test = Ldae.pool(t_train, pool), Ldae.pool(t_test, pool)

        def knn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (N_test,) bool: which test images kNN gets right
            return knn_correct(a, train_y, b, test_y, k)

        # both poolings, whichever is configured: the paper's mean pool discards the token layout
        pooled = {how: knn(Ldae.pool(t_train, how), Ldae.pool(t_test, how)) for how in ("mean", "flatten")}
        raw = knn(train_x.flatten(1), test_x.flatten(1))
        untrained = knn(r_train, r_test)
        # the verdict depends on how each representation is normalised before the cosine (docs/studies/ldae-knn.md); a paired
        # test on the same test images says whether the features' kNN really differs from raw pixels'
        by_norm = {}
        for how in KNN_NORMALIZATIONS:
            f, r, u = ((pooled[pool], raw, untrained) if how == "none" else
                       (knn(*normalize_for_knn(f_train, f_test, how)),
                        knn(*normalize_for_knn(train_x.flatten(1), test_x.flatten(1), how)),
                        knn(*normalize_for_knn(r_train, r_test, how))))
            test = mcnemar_exact(f, r)
            by_norm[how] = {"features": accuracy(f), "raw_pixels": accuracy(r), "random_init": accuracy(u),
                            "features_only": test["a_only"], "raw_pixels_only": test["b_only"],
                            "p_value": test["p_value"]}

        metrics = runner.training_metrics(result) | {
            "feature_pool": pool,
            "knn_features": accuracy(pooled[pool]),
            "linear_probe_features": linear_probe(f_train, train_y, f_test, test_y, k, seed=cfg.seed),
            "knn_features_mean_pool": accuracy(pooled["mean"]),
            "knn_features_flatten": accuracy(pooled["flatten"]),
            "knn_raw_pixels": accuracy(raw),
            "linear_probe_raw_pixels": linear_probe(train_x.flatten(1), train_y, test_x.flatten(1), test_y, k,
                                                    seed=cfg.seed),
            "knn_random_init": accuracy(untrained),
            # test images only the features get right / only raw pixels get right, and the exact McNemar p
            "knn_vs_raw_pixels": {key: by_norm["none"][key] for key in ("features_only", "raw_pixels_only", "p_value")},
            "knn_by_normalization": by_norm,
            "feature_dim": int(f_train.shape[1]),
        }
        grid = grid_images(ema, test_x[:GRID_ROWS].to(dev), cfg.seed)
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_model(tmp, ema, kind="ldae", section=to_dict(cfg.ldae), image_shape=prep.image_shape,
                       full_config=to_dict(cfg))
            save_grid(tmp / "grid.png", grid, ncol=3)
        return runner.finish_training(ctx, metrics, params=params, inputs=inputs, out_dir=OUT, ckpt_dir=ckpt_dir)
