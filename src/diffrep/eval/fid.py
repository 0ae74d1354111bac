"""Fréchet distance and KID between image sets, in a named feature space; the maths is torchmetrics'.

Two feature spaces, never blurred in the metric names:
- `featnet`: the in-domain classifier's pooled penultimate layer (eval/feature_net.py);
  keys `fd_featnet`, `kid_featnet`. The default: it needs nothing downloaded.
- `inception`: the standard FID network (InceptionV3 pool3, 2048-d) loaded from a local
  weights file the user supplies (`eval.inception_weights`); keys `inception_fid`, `inception_kid`.

Features are extracted once per image set (`extract`) and handed to
torchmetrics' FrechetInceptionDistance / KernelInceptionDistance through an
identity `feature` module: with a custom module torchmetrics applies no input
conversion (its `normalize` flag only picks the dtype of a dummy probe image,
skipped here because the module declares `num_features`), so the features
reach the Fréchet / polynomial-MMD code unchanged, in float64.

Inception input: images in [-1, 1] -> uint8 [0, 255] (the same quantisation as
the prepared data), grey repeated to 3 channels; torchmetrics' NoTrainInceptionV3
resizes to 299 with the TF1-compatible bilinear resize (antialias=False, the
torch-fidelity reference path) and scales to [-1, 1] itself.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from diffrep.eval.features import batched
from diffrep.io import ArtifactError, load_torch


class _Identity(nn.Module):
    """The `feature` module handed to torchmetrics: features in, float64 features out."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def _check(real: torch.Tensor, fake: torch.Tensor, what: str) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what}: features must be (N, D) with the same D, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"{what}: needs at least 2 feature rows per set, got {len(real)} and {len(fake)}")
    for name, t in (("real", real), ("fake", fake)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {name} features contain NaN or Inf (a diverged model produced the images)")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) of two feature sets (N, D), by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check(real, fake, "frechet_distance")
    m = FrechetInceptionDistance(feature=_Identity(real.shape[1]))
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 50, subset_size: int = 500,
                    seed: int = 0) -> tuple[float, float]:
    """KID (unbiased polynomial-kernel MMD^2, mean and std over random subsets), by torchmetrics.

    subset_size is clipped to the smaller set; the subsets are drawn under a fixed seed.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check(real, fake, "kernel_distance")
    size = min(subset_size, len(real), len(fake))
    m = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=subsets, subset_size=size)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def distances(real: torch.Tensor, fake: torch.Tensor, *, space: str, subsets: int = 50, subset_size: int = 500,
              seed: int = 0) -> dict[str, float]:
    """FD and KID under keys that name the feature space: fd_<space>, kid_<space>, kid_<space>_std."""
    kid, kid_std = kernel_distance(real, fake, subsets=subsets, subset_size=subset_size, seed=seed)
    return {f"fd_{space}": frechet_distance(real, fake), f"kid_{space}": kid, f"kid_{space}_std": kid_std}


def extract(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, batch_size: int = 250,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Features (N, D) of images (N, C, H, W) in [-1, 1], in batches, on the CPU."""
    return batched(fn, images, batch_size=batch_size, device=device).float()


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
