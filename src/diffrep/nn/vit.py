"""A DiT-style ViT denoiser (Peebles & Xie) for l-DAE: image in, image out, conditioned on log-SNR.

Patches (p x p, flattened channel-major like models/pca.py) -> Linear -> + fixed 2D
sin-cos positions -> `depth` blocks -> final adaLN layer -> Linear -> patches -> image.
No class token. Each block is pre-LN attention + MLP with adaLN-Zero:
    h = LN(x) * (1 + scale) + shift;  x = x + gate * branch(h)
where (shift, scale, gate) come from a zero-initialised Linear(silu(temb)), so every
block is the identity at init; the final layer is zero too, so the output starts at 0.
The first depth // 2 blocks are the encoder (`encode`): l-DAE probes their tokens.
Attention goes through nn/attention.py (`attn_backend`, set_attention_backend).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from diffrep.nn.attention import MultiHeadSelfAttention
from diffrep.nn.embeddings import LogSNREmbedding
from diffrep.nn.layers import zero_


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), N = (H/p)*(W/p) in row-major order."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"patch size {p} must divide the image size {H}x{W}; change the patch size or data.image_size")
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(t: torch.Tensor, p: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, C*p*p) -> (B, C, H, W), the inverse of patchify."""
    C, H, W = shape
    t = t.reshape(t.shape[0], H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return t.reshape(t.shape[0], C, H, W)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table (h*w, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"ViT width {dim} must be divisible by 4 for 2D sin-cos positions")
    freqs = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = [f(pos.reshape(-1, 1) * freqs) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()  # (h*w, dim)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = zero_(nn.Linear(dim, 6 * dim))  # adaLN-Zero: shift, scale, gate for attn and mlp

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x (B, N, dim), c (B, dim) = silu(temb)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)  # each (B, 1, dim)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class ViT(nn.Module):
    def __init__(self, in_channels: int, image_size: int, patch_size: int = 4, dim: int = 128, depth: int = 6,
                 heads: int = 4, mlp_ratio: float = 4.0, out_channels: int | None = None):
        super().__init__()
        if depth < 2:
            raise ValueError(f"ViT depth {depth} must be >= 2 (the first half of the blocks is the encoder)")
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} must divide the image size {image_size}")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.image_size, self.patch_size, self.dim = image_size, patch_size, dim
        self.n_encoder = depth // 2
        g = image_size // patch_size
        self.embed = nn.Linear(in_channels * patch_size**2, dim)
        self.register_buffer("pos", sincos_2d(dim, g, g)[None], persistent=False)  # (1, N, dim)
        self.temb = LogSNREmbedding(dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, self.out_channels * patch_size**2)
        self._init()

    def _init(self) -> None:
        for m in self.modules():  # DiT: xavier linears, then zero the adaLN and output layers
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in self.temb.mlp:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        for b in self.blocks:
            zero_(b.ada)
        zero_(self.ada_out)
        zero_(self.out)

    def _tokens(self, x: torch.Tensor, logsnr: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ViT expects (B, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        logsnr = torch.as_tensor(logsnr, device=x.device, dtype=torch.float32).expand(x.shape[0])
        c = nn.functional.silu(self.temb(logsnr))  # (B, dim)
        h = self.embed(patchify(x, self.patch_size)) + self.pos  # (B, N, dim)
        for blk in self.blocks[:n_blocks]:
            h = blk(h, c)
        return h, c

    def encode(self, x: torch.Tensor, logsnr: torch.Tensor | float) -> torch.Tensor:
        """The encoder's tokens (B, N, dim): the output of the first depth // 2 blocks."""
        return self._tokens(x, logsnr, self.n_encoder)[0]

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor | float) -> torch.Tensor:
        """(B, C, H, W), log-SNR scalar or (B,) -> (B, out_channels, H, W)."""
        h, c = self._tokens(x, logsnr, len(self.blocks))
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=-1)
        out = self.out(self.norm_out(h) * (1 + scale) + shift)  # (B, N, out_C*p*p)
        return unpatchify(out, self.patch_size, (self.out_channels, self.image_size, self.image_size))
