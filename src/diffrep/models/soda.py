"""SODA: a bottleneck diffusion model (Hudson et al., CVPR 2024; docs/methods.md#soda).

An encoder maps a *source* view to a compact vector z; a UNet denoises a
*target* view conditioned on z (layer modulation: z's sub-vectors each
modulate one resolution level) and, for 3D data, on the target camera pose.
The encoder learns only through the decoder's diffusion loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from diffrep.config import SodaConfig
from diffrep.data.views import augment, pick_two_views
from diffrep.models.artifact import register
from diffrep.diffusion import ddim_sample, guided_batched, schedule_of, tile_batch, training_losses
from diffrep.nn import ResNetEncoder, UNet


class Soda(nn.Module):
    def __init__(self, cfg: SodaConfig, image_shape: tuple[int, int, int], pose_dim: int = 0):
        super().__init__()
        C, H, W = image_shape
        if H != W:
            raise ValueError(f"SODA expects square images, got {H}x{W}")
        self.cfg, self.image_shape, self.pose_dim = cfg, tuple(image_shape), pose_dim
        self.encoder = ResNetEncoder.from_config(cfg.encoder, C, H, out_dim=cfg.z_dim, output="vector",
                                                   head=cfg.encoder_head)
        self.decoder = UNet.from_config(cfg.unet, C, C, H, z_dim=cfg.z_dim, pose_dim=pose_dim,
                                        z_split=cfg.modulation == "layer")
        self.n_groups = len(self.decoder.z_sizes)  # layer: one z sub-vector per resolution level; global: one
        self.schedule = schedule_of(cfg.diffusion)

    # ------------------------------------------------------------ training
    def views(self, batch: dict[str, torch.Tensor], rng):
        """-> source (B,C,H,W), target (B,C,H,W), target pose (B,P) or None."""
        if "poses" in batch:  # 3D data: images (B, V, C, H, W), one row per object
            if self.cfg.views == "same":  # auto-encoding one view at its own pose (the NVS ablation)
                images, poses = batch["images"], batch["poses"]
                view, ar = rng.randint(images.shape[1]), torch.arange(images.shape[0])
                return images[ar, view], images[ar, view], poses[ar, view]
            return pick_two_views(batch["images"], batch["poses"], rng)
        x = batch["images"]
        if self.cfg.views == "same":
            return x, x, None
        return augment(x, self.cfg.source_views, rng), augment(x, self.cfg.target_views, rng), None

    def forward(self, batch: dict[str, torch.Tensor], rng):
        source, target, pose = self.views(batch, rng)
        z = self.encoder(source)  # (B, z_dim)
        # per-sub-vector masking, and (independently) dropping all of z or the pose for guidance
        z_keep = ~rng.bernoulli(self.cfg.mask_rate, self.n_groups) & ~rng.bernoulli(self.cfg.z_drop, 1)  # (B, G)
        pose_keep = ~rng.bernoulli(self.cfg.pose_drop) if pose is not None else None
        d = self.cfg.diffusion
        out = training_losses(
            lambda z_t, logsnr: self.decoder(z_t, logsnr, z=z, z_keep=z_keep, pose=pose, pose_keep=pose_keep),
            target, rng.rand(), self.schedule,
            parameterization=d.parameterization, weighting=d.weighting, sigmoid_bias=d.sigmoid_bias,
            eps=rng.randn(*target.shape[1:]),
        )
        loss = out["loss"].mean()
        return loss, {"mse": out["mse"].mean().detach()}

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> z (B, z_dim)."""
        return self.encoder(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, pose: torch.Tensor | None = None, *, noise: torch.Tensor | None = None,
               steps: int | None = None, guidance: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM from pure noise conditioned on z (and a target pose) -> images in [-1, 1]."""
        d = self.cfg.diffusion
        w = self.cfg.guidance if guidance is None else guidance

        def denoise_drop(z_t, logsnr, drop):  # drop: (n,) bool, n = B or 2B (guided_batched)
            n = z_t.shape[0]
            # the null drops the latent only: the pose is the query, not the condition being guided
            z_keep = (~drop)[:, None].expand(n, self.n_groups)
            p = tile_batch(pose, n) if pose is not None else None
            p_keep = torch.ones(n, dtype=torch.bool, device=z_t.device) if pose is not None else None
            return self.decoder(z_t, logsnr, z=tile_batch(z, n), z_keep=z_keep, pose=p, pose_keep=p_keep)

        B = z.shape[0]
        denoise = guided_batched(denoise_drop, w)
        if noise is None:
            noise = torch.randn((B, *self.image_shape), generator=generator).to(z.device)
        x = ddim_sample(denoise, noise, self.schedule, steps=steps or d.sample_steps, eta=d.eta,
                        grid=d.sample_grid, parameterization=d.parameterization, clip_x0=1.0)
        return x.clamp(-1, 1)

    def reconstruct(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """Encode -> DDIM decode (2D data: the same view back)."""
        return self.decode(self.encode(x), **kw)

    def novel_view(self, source: torch.Tensor, target_pose: torch.Tensor, **kw) -> torch.Tensor:
        """Encode a source view, render the object from `target_pose` (B, P)."""
        return self.decode(self.encode(source), target_pose, **kw)

    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, n: int = 8, *, seed: int = 0, **kw) -> torch.Tensor:
        """Decode n latents on the line between two images' codes, with shared noise -> (n, C, H, W)."""
        za, zb = self.encode(x_a[None] if x_a.dim() == 3 else x_a[:1]), self.encode(x_b[None] if x_b.dim() == 3 else x_b[:1])
        alphas = torch.linspace(0, 1, n, device=za.device)[:, None]
        z = (1 - alphas) * za + alphas * zb  # (n, z_dim)
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((1, *self.image_shape), generator=g).expand(n, -1, -1, -1).to(z.device)
        return self.decode(z, noise=noise, **kw)


@register("soda")
def _build(section: dict, image_shape, extra: dict) -> Soda:
    return Soda(SodaConfig.model_validate(section), image_shape, pose_dim=extra.get("pose_dim", 0))
