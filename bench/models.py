"""Build each model exactly as its pipeline stage does, with synthetic data of the real shape.

The speed of a training step does not depend on pixel values or trained
weights, so random images (uniform in [-1, 1], like the prepared data) and
freshly initialised models stand in for the real ones; what matters is that
the networks, configs, batch sizes and image shape are the pipeline's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffrep.config import Config, TrainConfig

MODELS = ("soda", "ul_stage1", "ul_stage2", "ldae")
TRAINED = MODELS + ("feature_net",)  # every trained stage of the pipeline (the FD feature space last)
LABELS = {"soda": "SODA", "ul_stage1": "UL stage 1 (encoder + prior + decoder)", "ul_stage2": "UL stage 2 (base)",
          "ldae": "l-DAE", "feature_net": "feature net (FD classifier)"}
NUM_CLASSES = 10  # the feature net's head: mnist5k / digits have ten classes


@dataclass
class ModelSpec:
    name: str  # the stage name
    model: nn.Module
    train_cfg: TrainConfig
    data: dict[str, torch.Tensor]  # engine data dict, N-first
    item_shape: tuple[int, ...]  # one training item (image or latent)


def image_shape(cfg: Config, root: Path) -> tuple[int, int, int]:
    """(C, S, S) the pipeline trains on: the prepared manifest when present, else derived from params."""
    manifest = root / "data/prepared/manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("source") == cfg.data.source and m["image_shape"][-1] == cfg.data.image_size:
            return tuple(m["image_shape"])
    # mnist5k and digits are grey; shapes is rendered in colour; user folders are assumed RGB
    channels = 1 if cfg.data.source in ("mnist5k", "digits") else 3
    return (channels, cfg.data.image_size, cfg.data.image_size)


def synthetic_images(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def n_items(batch_size: int) -> int:
    # a few batches: the engine's per-epoch permutation and row gather are part of the step
    return 4 * batch_size


def build(name: str, cfg: Config, shape: tuple[int, int, int]) -> ModelSpec:
    from diffrep.models.ldae import Ldae
    from diffrep.models.soda import Soda
    from diffrep.models.ul import UlBase, UnifiedLatents

    torch.manual_seed(cfg.seed)  # runner.stage seeds the global RNG before the model is built
    if name == "soda":
        t = cfg.soda.train
        return ModelSpec(name, Soda(cfg.soda, shape), t, {"images": synthetic_images(n_items(t.batch_size), shape)},
                         shape)
    if name == "ul_stage1":
        t = cfg.ul.stage1.train
        return ModelSpec(name, UnifiedLatents(cfg.ul.stage1, shape), t,
                         {"images": synthetic_images(n_items(t.batch_size), shape)}, shape)
    if name == "ul_stage2":
        s1 = cfg.ul.stage1
        latent = UnifiedLatents(s1, shape).latent_shape  # stage 2 trains on the frozen stage 1's latent grid
        t = cfg.ul.stage2.train
        latents = torch.randn((n_items(t.batch_size), *latent), generator=torch.Generator().manual_seed(0))
        return ModelSpec(name, UlBase(cfg.ul.stage2, latent, s1.logsnr_z0), t, {"latents": latents}, tuple(latent))
    if name == "ldae":
        t = cfg.ldae.train
        images = synthetic_images(n_items(t.batch_size), shape)
        model = Ldae(cfg.ldae, shape)
        model.fit_tokenizer(images, seed=cfg.seed)  # the step needs a fitted tokenizer; its values do not matter
        return ModelSpec(name, model, t, {"images": images}, shape)
    if name == "feature_net":
        from diffrep.eval.feature_net import FeatureNet

        t = cfg.feature_net.train
        n = n_items(t.batch_size)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(0))
        return ModelSpec(name, FeatureNet(cfg.feature_net, shape, NUM_CLASSES), t,
                         {"images": synthetic_images(n, shape), "labels": labels}, shape)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(TRAINED)}")


def sampling_models(cfg: Config, shape: tuple[int, int, int]):
    """Randomly initialised SODA, UL stage 1 and UL base of the default config, in eval mode."""
    from diffrep.models.soda import Soda
    from diffrep.models.ul import UlBase, UnifiedLatents

    torch.manual_seed(cfg.seed)
    soda = Soda(cfg.soda, shape).eval()
    stage1 = UnifiedLatents(cfg.ul.stage1, shape).eval()
    base = UlBase(cfg.ul.stage2, stage1.latent_shape, cfg.ul.stage1.logsnr_z0).eval()
    return soda, stage1, base
