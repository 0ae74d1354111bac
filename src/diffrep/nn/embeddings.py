"""Conditioning embeddings: the noise level (log-SNR) and an optional vector such as a camera pose.

The networks never see a time t, only lambda = log-SNR, so one model serves
every schedule. lambda is unbounded (about [-20, 20] in practice, +-inf at the
ends), so it is first mapped to a bounded "cosine time"
    u = (2 / pi) * arctan(exp(-lambda / 2))   in (0, 1),
the t that the cosine schedule would assign to lambda (u = 0.5 at lambda = 0,
u -> 0 as lambda -> +inf, u -> 1 as lambda -> -inf; Simple Diffusion's choice).
Any lambda, even +-inf, lands in range, and the familiar DDPM sinusoidal
features of 1000 * u then resolve the mid-noise levels where training happens.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def logsnr_to_unit(logsnr: torch.Tensor) -> torch.Tensor:
    """lambda -> cosine-schedule time u in [0, 1] (monotone decreasing; exp overflow to inf is fine)."""
    return torch.atan(torch.exp(-0.5 * logsnr.float())) * (2 / math.pi)


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) -> (B, dim) sin/cos features at geometric frequencies 1 .. 1/max_period (DDPM/DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb if dim % 2 == 0 else torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)


class LogSNREmbedding(nn.Module):
    """log-SNR (B,) -> time embedding (B, dim): arctan map, sinusoidal features, 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(1000.0 * logsnr_to_unit(logsnr), self.freq_dim))


class VectorEmbedding(nn.Module):
    """A conditioning vector (B, in_dim) -> (B, dim) by an MLP; dropped rows get a learned null embedding.

    `keep` (B,) bool: False -> the null embedding (classifier-free guidance drop);
    `v=None` -> the null embedding for the whole batch.
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, v: torch.Tensor | None, keep: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
        if v is None:
            if batch is None:
                raise ValueError("VectorEmbedding: pass `batch` when the vector is None")
            return self.null.expand(batch, -1)
        if v.dim() != 2 or v.shape[1] != self.in_dim:
            raise ValueError(f"VectorEmbedding: expected a (B, {self.in_dim}) vector, got {tuple(v.shape)}")
        emb = self.mlp(v)  # (B, dim)
        if keep is None:
            return emb
        return torch.where(keep.reshape(-1, 1).bool(), emb, self.null.to(emb.dtype))
