"""Patch-PCA tokenizer for l-DAE (docs/methods.md#l-dae): a fixed linear map, fitted once, never trained.

An image (B, C, H, W) is cut into non-overlapping p x p patches, each flattened
to D = C*p*p values (channel-major, then rows, then columns). PCA of those
patch vectors gives an orthonormal basis V (D, D), rows sorted by decreasing
variance, and the per-component standard deviations s (D,) on the fitting data.

Two coordinate systems, both batched over all patches at once:
  coords(x)  = (patch - mean) @ V^T            orthonormal: a rotation of the centred patch,
                                               so squared norms equal pixel squared errors
  encode(x)  = coords(x) / s                   *standardised*: every coefficient has unit
                                               variance on the fitting patches (the tokenizer's latent;
                                               s = 1 when fitted with standardize=False)
decode inverts encode exactly at full rank (V is orthogonal; s is clamped away
from 0, and the same clamped s multiplies back). Given only the top d
coefficients, decode sets the rest to 0 (the mean patch): the paper's lossy
tokenizer V_d^T.

The fitted tensors are buffers, so they live in the model's state_dict and
travel with the model artifact; `fitted` records whether fit_ has run.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from diffrep.nn.vit import patchify, unpatchify  # one patch layout for the tokenizer and the ViT


class PatchPCA(nn.Module):
    def __init__(self, channels: int, patch_size: int):
        super().__init__()
        self.patch_size, self.channels = patch_size, channels
        D = channels * patch_size * patch_size
        self.dim = D
        self.register_buffer("mean", torch.zeros(D))  # (D,)
        self.register_buffer("basis", torch.eye(D))  # (D, D), row k = k-th principal direction
        self.register_buffer("std", torch.ones(D))  # (D,), clamped std of each coefficient
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit_(self, images: torch.Tensor, n_patches: int, generator: torch.Generator | None = None,
             standardize: bool = True) -> "PatchPCA":
        """Fit on `n_patches` grid patches drawn without replacement from `images` (N, C, H, W).

        `images` may be a tensor or a memory-mapped ImageRows: only the images holding a drawn patch are read.
        standardize=False keeps s = 1: then encode = coords, the latent at its natural scale.
        """
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1] != self.channels:
            raise ValueError(f"PatchPCA.fit_: expected images (N, {self.channels}, H, W), got {shape}")
        per_image = (shape[2] // self.patch_size) * (shape[3] // self.patch_size)
        total = shape[0] * per_image  # patch k is patch k % per_image of image k // per_image
        if total < self.dim + 1:
            raise ValueError(f"PatchPCA.fit_: {total} patches cannot fit {self.dim} components; use more images")
        sel = torch.randperm(total, generator=generator)[:n_patches] if n_patches < total else torch.arange(total)
        ids, inv = torch.unique(sel // per_image, return_inverse=True)  # the images to read, sorted
        imgs = images[ids] if len(ids) < shape[0] else images[:]  # (n_read, C, H, W)
        patches = patchify(imgs.float(), self.patch_size).reshape(len(ids), per_image, self.dim)
        p = patches[inv, sel % per_image].double()  # (n_patches, D), in the draw's order
        mean = p.mean(0)
        cov = (p - mean).T @ (p - mean) / (len(p) - 1)  # (D, D)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        # a deterministic sign: the largest-magnitude entry of each direction is positive
        sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
        evecs = evecs * sign
        std = evals.sqrt().clamp_min(1e-6 * max(evals[0].sqrt().item(), 1e-12))  # dead components stay invertible
        self.mean.copy_(mean.float())
        self.basis.copy_(evecs.T.float())
        self.std.copy_(std.float() if standardize else torch.ones_like(self.std))
        self.fitted.fill_(True)
        return self

    def _check(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError("PatchPCA is not fitted: call fit_(train_images, n_patches) first (or load a fitted model)")

    def coords(self, x: torch.Tensor, centre: bool = True) -> torch.Tensor:
        """(B, C, H, W) -> orthonormal PCA coordinates of the (centred) patches (B, N, D).

        centre=False maps a *difference* of images (a residual, a noise) without subtracting the mean.
        """
        self._check()
        t = patchify(x, self.patch_size)
        return (t - self.mean if centre else t) @ self.basis.T

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> standardised coefficients (B, N, D), unit variance on the fitting data."""
        return self.coords(x) / self.std

    def decode(self, z: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """Standardised coefficients (B, N, k), k <= D, -> image (B, C, H, W) from the top k components
        (the others at 0, i.e. at the mean patch); k = D inverts `encode` exactly."""
        self._check()
        k = z.shape[-1]
        if k > self.dim:
            raise ValueError(f"PatchPCA.decode: {k} coefficients given, the tokenizer has {self.dim}")
        c = (z * self.std[:k]) @ self.basis[:k] + self.mean  # (B, N, D)
        return unpatchify(c, self.patch_size, shape)
