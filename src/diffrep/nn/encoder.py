"""A small pre-activation ResNet encoder: image -> vector (SODA's bottleneck z) or latent grid (Unified Latents).

Layout: 3x3 stem conv -> `stages` stages of `depth` residual blocks
(GroupNorm -> SiLU -> conv, twice), a stride-2 conv between stages that also
doubles the width (width * 2**stage) -> GroupNorm -> SiLU -> head:
  output="vector": flatten the final s x s map -> Linear(out_dim)       -> (B, out_dim)
                   (head="flatten", the default: on 16-32 px images the final
                   map is 4x4 and *where* a stroke is carries information that
                   a pool throws away; head="mean" is the global average pool
                   of a standard ResNet, SODA's paper encoder)
  output="grid":   3x3 conv to grid_channels at the final resolution     -> (B, grid_channels, s, s),
                   s = image_size / 2**(stages-1) (16 px, 3 stages -> 4x4)
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from diffrep.nn.layers import check_groups, preact_body


class ResNetEncoder(nn.Module):
    def __init__(self, in_channels: int, image_size: int, width: int = 32, depth: int = 1, stages: int = 3,
                 out_dim: int = 64, output: Literal["vector", "grid"] = "vector",
                 grid_channels: int | None = None, groups: int = 8, head: Literal["flatten", "mean"] = "flatten"):
        super().__init__()
        if stages < 1 or depth < 1:
            raise ValueError(f"ResNetEncoder: stages ({stages}) and depth ({depth}) must be >= 1")
        if image_size % 2 ** (stages - 1):
            raise ValueError(f"ResNetEncoder: image_size={image_size} must be divisible by 2**(stages-1)="
                             f"{2 ** (stages - 1)}; use fewer stages or another image size")
        if output not in ("vector", "grid"):
            raise ValueError(f"ResNetEncoder: output must be 'vector' or 'grid', got {output!r}")
        if head not in ("flatten", "mean") or (output == "grid" and head != "flatten"):
            raise ValueError(f"ResNetEncoder: head must be 'flatten' or 'mean' (vector output only), got {head!r}")
        if output == "grid" and not grid_channels:
            raise ValueError("ResNetEncoder: output='grid' needs grid_channels (the latent channels, e.g. 4)")
        widths = [width * 2 ** s for s in range(stages)]
        for w in widths:
            check_groups(w, groups, "ResNetEncoder")
        self.in_channels, self.image_size, self.output, self.pool = in_channels, image_size, output, head == "mean"
        self.grid_size = image_size // 2 ** (stages - 1)
        self.body = preact_body(in_channels, widths, depth, groups)
        if output == "vector":
            self.head: nn.Module = nn.Linear(widths[-1] * (1 if self.pool else self.grid_size ** 2), out_dim)
            self._out_shape: tuple[int, ...] = (out_dim,)
        else:
            self.head = nn.Conv2d(widths[-1], grid_channels, 3, padding=1)
            self._out_shape = (grid_channels, self.grid_size, self.grid_size)

    @classmethod
    def from_config(cls, cfg, in_channels: int, image_size: int, **kw) -> "ResNetEncoder":
        """Build from a `diffrep.config.EncoderConfig`; `kw` adds out_dim / output / grid_channels."""
        return cls(in_channels, image_size, **cfg.model_dump(), **kw)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-example output shape: (out_dim,) or (grid_channels, s, s)."""
        return self._out_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ResNetEncoder: x must be (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        h = self.body(x)  # (B, C, s, s)
        if self.output == "grid":
            return self.head(h)
        return self.head(h.mean((2, 3)) if self.pool else h.flatten(1))  # (B, out_dim)
