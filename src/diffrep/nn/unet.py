"""A DDPM-style UNet denoiser with AdaGN, conditioned on log-SNR and, optionally, a latent z
(SODA's layer modulation), a pose vector and a spatial conditioning grid (Unified Latents).

Residual blocks modulate their second GroupNorm (AdaGN, as in SODA):
    h = z_s * (t_s * GroupNorm(h) + t_b) + z_b
    t_s, t_b = 1 + Linear(silu(temb)), Linear(silu(temb))   temb = logSNR embedding (+ pose embedding)
    z_s, z_b = 1 + Linear(z_level),    Linear(z_level)
so a missing or dropped latent sub-vector is exactly the identity (z_s = 1, z_b = 0).
The modulation Linears, each residual branch's last conv and the output conv
start at zero: every block is the identity at init and the output is zero.

Layer modulation: z (B, z_dim) is split into one sub-vector per resolution level
(len(channel_mult) groups; sizes as even as possible, the first z_dim % G groups
one larger). Group 0 is the finest level (full resolution), group G-1 the
coarsest; group i drives every residual block of level i in the down path and
the up path, and the middle blocks use group G-1. `z_keep` (B, G) bool switches
groups off per example: per-sub-vector masking in training, and with every
entry False, the "no z" branch of classifier-free guidance.

Self-attention sits after every residual block whose feature-map size is in
`attn_resolutions` (down, middle and up); sizes that no level has are ignored,
so 28 px images want e.g. (7,), 16/32 px ones (4,) or (8,).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffrep.nn.attention import SelfAttention2d
from diffrep.nn.embeddings import LogSNREmbedding, VectorEmbedding
from diffrep.nn.layers import check_groups, zero_


def split_sizes(total: int, n: int) -> list[int]:
    """`total` split into `n` parts as evenly as possible, larger parts first: (10, 3) -> [4, 3, 3]."""
    base, extra = divmod(total, n)
    return [base + (i < extra) for i in range(n)]


class ResBlock(nn.Module):
    """Pre-activation residual block with AdaGN on the second norm; `level` picks its z sub-vector."""

    def __init__(self, cin: int, cout: int, temb_dim: int, z_dim: int, groups: int, level: int):
        super().__init__()
        self.level = level
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, affine=False)  # AdaGN supplies scale and shift
        self.t_mod = zero_(nn.Linear(temb_dim, 2 * cout))
        self.z_mod = zero_(nn.Linear(z_dim, 2 * cout)) if z_dim else None
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb, z=None, keep=None):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        t_s, t_b = self.t_mod(F.silu(temb))[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
        h = (1 + t_s) * h + t_b
        if z is not None and self.z_mod is not None:
            m = self.z_mod(z)  # (B, 2C)
            if keep is not None:  # a dropped sub-vector -> zero offsets -> identity modulation
                m = m * keep.to(m.dtype)[:, None]
            z_s, z_b = m[:, :, None, None].chunk(2, dim=1)
            h = (1 + z_s) * h + z_b
        return self.skip(x) + self.conv2(F.silu(h))


class Downsample(nn.Conv2d):
    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, image_size: int, channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions: tuple[int, ...] = (4,), groups: int = 8, heads: int = 2,
                 z_dim: int = 0, pose_dim: int = 0, cond_channels: int = 0, z_split: bool = True):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1:
            raise ValueError("UNet: channel_mult needs at least one level and num_res_blocks must be >= 1")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"UNet: image_size={image_size} must be divisible by 2**(len(channel_mult)-1)="
                             f"{2 ** (levels - 1)}; use fewer levels in channel_mult or another image size")
        if 0 < z_dim < levels:
            raise ValueError(f"UNet: z_dim={z_dim} is smaller than the number of levels ({levels}); "
                             "every level needs at least one latent dimension")
        widths = [channels * m for m in channel_mult]
        for w in [channels, *widths]:
            check_groups(w, groups, "UNet")
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.levels = levels
        self.z_dim, self.pose_dim, self.cond_channels = z_dim, pose_dim, cond_channels
        # sub-vector sizes, finest level first; z_split=False: one group, the whole z modulates every level
        self.z_split = z_split
        self.z_sizes = (split_sizes(z_dim, levels) if z_split else [z_dim]) if z_dim else []
        temb_dim = 4 * channels
        self.time_embed = LogSNREmbedding(temb_dim)
        self.pose_embed = VectorEmbedding(pose_dim, temb_dim) if pose_dim else None
        self.conv_in = nn.Conv2d(in_channels + cond_channels, channels, 3, padding=1)

        def res(cin, cout, level):
            zin = (self.z_sizes[level] if z_split else z_dim) if z_dim else 0
            return ResBlock(cin, cout, temb_dim, zin, groups, level)

        def attn(ch, size):
            return SelfAttention2d(ch, heads, groups) if size in attn_resolutions else nn.Identity()

        # down path: every [res, attn] pair and every Downsample leaves one skip tensor
        self.down, skips, ch, size = nn.ModuleList(), [channels], channels, image_size
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([res(ch, w, i), attn(w, size)]))
                ch = w
                skips.append(ch)
            if i < levels - 1:
                self.down.append(Downsample(ch))
                size //= 2
                skips.append(ch)
        self.mid = nn.ModuleList([res(ch, ch, levels - 1), attn(ch, size), res(ch, ch, levels - 1)])
        # up path: num_res_blocks + 1 blocks per level, each consuming one skip
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([res(ch + skips.pop(), widths[i], i), attn(widths[i], size)]))
                ch = widths[i]
            if i > 0:
                self.up.append(Upsample(ch))
                size *= 2
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = zero_(nn.Conv2d(ch, out_channels, 3, padding=1))

    @classmethod
    def from_config(cls, cfg, in_channels: int, out_channels: int, image_size: int, **kw) -> "UNet":
        """Build from a `diffrep.config.UNetConfig`; `kw` adds z_dim / pose_dim / cond_channels."""
        return cls(in_channels, out_channels, image_size, **cfg.model_dump(), **kw)

    def _latent_groups(self, z, z_keep, B):
        """Per level: (z sub-vector (B, size), keep (B,) or None), or (None, None) without z."""
        if z is None:
            if z_keep is not None:
                raise ValueError("UNet: z_keep was given without z")
            return [(None, None)] * self.levels
        levels = len(self.z_sizes)  # columns of z_keep: one per group
        if not self.z_dim:
            raise ValueError("UNet: got z but the model was built with z_dim=0")
        if tuple(z.shape) != (B, self.z_dim):
            raise ValueError(f"UNet: z must be ({B}, {self.z_dim}), got {tuple(z.shape)}")
        if z_keep is not None and tuple(z_keep.shape) != (B, levels):
            raise ValueError(f"UNet: z_keep must be a ({B}, {levels}) bool mask (one column per level), "
                             f"got {tuple(z_keep.shape)}")
        if not self.z_split:
            return [(z, None if z_keep is None else z_keep[:, 0])] * self.levels
        groups = z.split(self.z_sizes, dim=1)
        return [(g, None if z_keep is None else z_keep[:, i]) for i, g in enumerate(groups)]

    def forward(self, x, logsnr, z=None, z_keep=None, pose=None, pose_keep=None, cond=None):
        B, _, H, W = x.shape
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"UNet: x must be (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        logsnr = torch.as_tensor(logsnr, device=x.device, dtype=torch.float32)
        logsnr = logsnr.expand(B) if logsnr.dim() == 0 else logsnr
        if logsnr.shape != (B,):
            raise ValueError(f"UNet: logsnr must be a scalar or ({B},), got {tuple(logsnr.shape)}")
        temb = self.time_embed(logsnr)  # (B, temb_dim)
        if self.pose_embed is not None:  # pose=None: the null pose for the whole batch
            temb = temb + self.pose_embed(pose, pose_keep, B)
        elif pose is not None:
            raise ValueError("UNet: got pose but the model was built with pose_dim=0")
        if self.cond_channels:
            if cond is None or cond.dim() != 4 or cond.shape[:2] != (B, self.cond_channels):
                raise ValueError(f"UNet: cond must be (B={B}, {self.cond_channels}, h, w), got "
                                 f"{None if cond is None else tuple(cond.shape)}")
            if cond.shape[-2:] != (H, W):
                cond = F.interpolate(cond, size=(H, W), mode="nearest")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("UNet: got cond but the model was built with cond_channels=0")
        zs = self._latent_groups(z, z_keep, B)

        def block(pair, h):
            res, attn = pair
            return attn(res(h, temb, *zs[res.level]))

        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = block(layer, h) if isinstance(layer, nn.ModuleList) else layer(h)
            hs.append(h)
        res1, attn, res2 = self.mid
        h = res2(attn(res1(h, temb, *zs[-1])), temb, *zs[-1])
        for layer in self.up:
            h = block(layer, torch.cat([h, hs.pop()], dim=1)) if isinstance(layer, nn.ModuleList) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
