"""Batched view sampling on the tensor side (SODA's source/target views).

2D data: a view is a random-resized crop (+ optional flip) and an intensity
jitter, applied to the whole batch at once with one `affine_grid` /
`grid_sample` call, so no per-image Python runs in the training step.
3D data (shapes): a view is one of an object's rendered cameras; the source
and target are two different cameras of the same object.

All randomness comes from the engine's `BatchRNG`, so views are identical
after a resume and across DDP world sizes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffrep.config import ViewsConfig


def random_resized_crop(x: torch.Tensor, policy: ViewsConfig, rng) -> torch.Tensor:
    """x: (B, C, H, W) in [-1, 1] -> same shape, each image cropped and resized by its own draw."""
    lo, hi = policy.crop_scale
    scale = lo + (hi - lo) * rng.rand()  # (B,) area fraction kept
    log_r = math.log(policy.crop_ratio[0]) + (math.log(policy.crop_ratio[1]) - math.log(policy.crop_ratio[0])) * rng.rand()
    ratio = torch.exp(log_r)  # (B,) width / height
    w = torch.sqrt(scale * ratio).clamp(max=1.0)  # crop size as a fraction of the image side
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * rng.rand() - 1)  # crop centre in normalised [-1, 1] coords
    cy = (1 - h) * (2 * rng.rand() - 1)
    sx = w
    if policy.flip:
        sx = torch.where(rng.bernoulli(0.5), -w, w)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([sx, zero, cx], -1), torch.stack([zero, h, cy], -1)], 1)  # (B, 2, 3)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # border padding: the crop never leaves the image, but bilinear taps at the edge may
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_intensity(x: torch.Tensor, policy: ViewsConfig, rng) -> torch.Tensor:
    """Brightness and contrast jitter per image, in [0, 1] space, clamped back to [-1, 1]."""
    if policy.brightness == 0 and policy.contrast == 0:
        return x
    shape = (-1,) + (1,) * (x.dim() - 1)
    u = (x + 1) / 2
    if policy.contrast:
        c = 1 + policy.contrast * (2 * rng.rand() - 1)
        mean = u.mean(dim=(1, 2, 3), keepdim=True)
        u = (u - mean) * c.to(x).view(shape) + mean
    if policy.brightness:
        b = 1 + policy.brightness * (2 * rng.rand() - 1)
        u = u * b.to(x).view(shape)
    return (u.clamp(0, 1) * 2 - 1)


def augment(x: torch.Tensor, policy: ViewsConfig, rng) -> torch.Tensor:
    return jitter_intensity(random_resized_crop(x, policy, rng), policy, rng)


def pick_two_views(images: torch.Tensor, poses: torch.Tensor, rng):
    """images (B, V, C, H, W), poses (B, V, P) -> source image, target image, target pose.

    The two camera indices differ for every object (the target is a novel view).
    """
    B, V = images.shape[:2]
    src = rng.randint(V)  # (B,)
    tgt = (src + 1 + rng.randint(V - 1)) % V  # uniform over the other V-1 views
    ar = torch.arange(B)
    return images[ar, src], images[ar, tgt], poses[ar, tgt]
