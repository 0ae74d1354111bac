"""The in-domain classifier whose penultimate layer is the Fréchet-distance feature space.

Inception weights cannot be downloaded here, and Inception features of 16x16
grey digits say little anyway, so generation quality is measured in the
feature space of a small supervised CNN trained on the prepared training
split (the `feature_net` stage). The metrics name it as such (`fd_featnet`,
`kid_featnet`), never "FID". Like Inception's pool3, the features are the
globally average-pooled last convolutional map, just before the linear
classifier: (B, width * 2**(stages-1)).

Architecture: the body of the ResNet encoder (nn/layers.py `preact_body`): a
3x3 stem, then per stage `depth` pre-activation residual blocks (GroupNorm,
SiLU) and a stride-2 3x3 convolution between stages.
Training follows the engine's model protocol; the training views are
random-resized crops with a little intensity jitter (data/views.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffrep.config import ConfigError, FeatureNetConfig
from diffrep.data.views import augment
from diffrep.io import ArtifactError, load_torch
from diffrep.models.artifact import FILE, register
from diffrep.nn.layers import preact_body

KIND = "feature_net"


class FeatureNet(nn.Module):
    def __init__(self, cfg: FeatureNetConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        C, H, W = image_shape
        widths = [cfg.width * 2**i for i in range(cfg.stages)]
        if cfg.width % cfg.groups:
            raise ConfigError(f"feature_net.groups={cfg.groups} must divide feature_net.width={cfg.width}")
        if min(H, W) < 2 ** (cfg.stages - 1):
            raise ConfigError(f"feature_net.stages={cfg.stages} halves {H}x{W} images below 1 pixel; use fewer stages")
        if num_classes < 2:
            raise ValueError(f"feature_net needs at least 2 classes, the data has {num_classes}")
        self.cfg, self.image_shape, self.num_classes = cfg, tuple(image_shape), num_classes
        self.body = preact_body(C, widths, cfg.depth, cfg.groups)
        self.head = nn.Linear(widths[-1], num_classes)
        self.num_features = widths[-1]  # torchmetrics reads this instead of probing with a dummy image

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> pooled penultimate features (B, D)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, batch: dict[str, torch.Tensor], rng):
        x = augment(batch["images"], self.cfg.augment, rng)
        logits = self.head(self.embed(x))  # (B, K)
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(1) == batch["labels"]).float().mean()
        return loss, {"accuracy": acc.detach()}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> class indices (B,)."""
        return self.head(self.embed(x)).argmax(1)


@register(KIND)
def _build(section: dict, image_shape, extra: dict) -> FeatureNet:
    return FeatureNet(FeatureNetConfig.model_validate(section), image_shape, int(extra["num_classes"]))


def load_feature_net(path: str | Path) -> FeatureNet:
    """models/feature_net/ (or its model.pt) -> the trained classifier in eval mode."""
    import json

    file = Path(path) / FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ArtifactError(f"{file}: feature net not found; run `dvc repro feature_net` (diffrep stage feature_net)")
    payload = load_torch(file, verify=True)  # the content hash save_model wrote: a damaged file is refused
    try:
        if payload["kind"] != KIND:
            raise ArtifactError(f"{file}: holds a {payload['kind']!r} model, expected {KIND!r}")
        net = _build(json.loads(payload["section"]), tuple(payload["image_shape"]), json.loads(payload["extra"]))
        net.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{file}: not a loadable feature-net artifact ({type(e).__name__}: {e}); "
                            "re-run the feature_net stage") from None
    return net.eval().requires_grad_(False)
