"""`feature_net` stage: train the in-domain classifier that defines the Fréchet-distance feature space.

Writes models/feature_net/ (EMA weights, resolved config) and
metrics/feature_net.json: test and train top-1 accuracy (a feature space is
only meaningful if the classifier is good), feature dimension, steps, img/s,
wall time and the lineage block. The loss curve goes to
metrics/feature_net_loss.tsv like every trained stage.
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import load_prepared
from diffrep.eval.feature_net import KIND, FeatureNet
from diffrep.eval.features import batched
from diffrep.io import atomic_dir
from diffrep.models.artifact import save_model
from diffrep.stages import runner

PREPARED = Path("data/prepared")
OUT = Path("models/feature_net")


def accuracy(net: FeatureNet, x: torch.Tensor, y: torch.Tensor, device) -> float:
    return (batched(net.predict, x, device=device) == y).float().mean().item()


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("feature_net", cfg, root) as ctx:
        prep = load_prepared(ctx.path(PREPARED))
        train_x, train_y = prep.image_rows("train"), torch.from_numpy(prep.labels("train"))  # images memory-mapped
        model = FeatureNet(cfg.feature_net, prep.image_shape, prep.num_classes)
        params = runner.section_params(cfg, "feature_net")
        inputs = [ctx.path(PREPARED)]
        result, ckpt_dir = runner.train(ctx, model, cfg.feature_net.train, {"images": train_x, "labels": train_y},
                                        params=params, inputs=inputs)
        if not ctx.is_main:
            return None
        ema, dev = result.ema, ctx.runtime.device
        prep.release_test()  # nothing is chosen here
        metrics = {
            "val_accuracy": accuracy(ema, prep.image_rows("val"), torch.from_numpy(prep.labels("val")), dev),
            "test_accuracy": accuracy(ema, prep.image_rows("test"), torch.from_numpy(prep.labels("test")), dev),
            "train_accuracy": accuracy(ema, train_x, train_y, dev),
            "feature_dim": ema.num_features,
            "num_classes": prep.num_classes,
        } | runner.training_metrics(result)
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_model(tmp, ema, kind=KIND, section=to_dict(cfg.feature_net), image_shape=prep.image_shape,
                       extra={"num_classes": prep.num_classes}, full_config=to_dict(cfg))
        return runner.finish_training(ctx, metrics, params=params, inputs=inputs, out_dir=OUT, ckpt_dir=ckpt_dir)
