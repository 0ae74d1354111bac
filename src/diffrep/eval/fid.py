"""The standard FID feature space: InceptionV3 pool3 from a local weights file (nothing is downloaded).

Used only when the user supplies `eval.inception_weights`; the default feature
space is the in-domain classifier (eval/feature_net.py). The distances
themselves (FD, KID, intervals) are eval/distances.py, the same for both spaces.

Inception input: images in [-1, 1] -> uint8 [0, 255] (the same quantisation as
the prepared data), grey repeated to 3 channels; torchmetrics' NoTrainInceptionV3
resizes to 299 with the TF1-compatible bilinear resize (antialias=False, the
torch-fidelity reference path) and scales to [-1, 1] itself.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn as nn

from diffrep.io import ArtifactError, load_torch


# ---------------------------------------------------------------- Inception (standard FID)
class InceptionFeatures(nn.Module):
    """The standard FID InceptionV3 (pool3, 2048-d), from a local weights file: images in [-1, 1] -> (B, 2048)."""

    num_features = 2048

    def __init__(self, weights_path: str | Path):
        super().__init__()
        self.net = load_inception(weights_path)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the data's own quantisation
        return self.net(u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8)


def load_inception(weights_path: str | Path) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 with weights from a local file, loaded with weights_only=True.

    The file is the state dict torch-fidelity (and torchmetrics) use for FID,
    `weights-inception-2015-12-05-6726825d.pth` (the TF 2015-12-05 graph converted to PyTorch).
    torch-fidelity itself would unpickle the path with weights_only=False; instead we load the
    tensors safely and hand it an in-memory copy re-serialised from those plain tensors.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # pragma: no cover - torchmetrics is a dependency
        raise RuntimeError(f"Inception FID needs torchmetrics: {e}") from None
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"eval.inception_weights: {path} not found; give the path of the standard FID "
                            "InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth), or null to skip")
    state = load_torch(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"eval.inception_weights: {path} is not a state dict of tensors")
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=buf, antialias=False)
    except (RuntimeError, KeyError) as e:
        raise ArtifactError(f"eval.inception_weights: {path} does not fit the FID InceptionV3 "
                            f"({type(e).__name__}: {str(e)[:300]}); expected torch-fidelity's "
                            "weights-inception-2015-12-05-6726825d.pth") from None
    return net.eval().requires_grad_(False)
