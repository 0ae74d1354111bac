"""Unified Latents (Heek et al. 2026; docs/methods.md#unified-latents): a latent regularised by a diffusion prior.

Stage 1 (`UnifiedLatents`): a deterministic encoder gives a latent grid
z_clean (latent_channels, s, s), s = H / 2**(encoder.stages-1) (16 px, 3 stages
-> 4x4). It is noised once to the fixed level lambda_z(0) = logsnr_z0:
z0 = alpha0 z_clean + sigma0 eps. Two diffusion models are trained with it, by
one optimizer, jointly with the encoder:

- the PRIOR, on latents, with the plain ELBO (weight 1): t ~ U[0,1] on a
  linear log-SNR schedule from logsnr_z0 (t=0) to logsnr_z1 (t=1),
      L_z = -dlambda/dt * 1/2 * ||eps - eps_hat||^2  (summed over latent dims)
            + KL(q(z_1 | z_clean) || N(0, I)).
  It upper-bounds KL(q(z0 | x) || p(z0)): the latent's bitrate, in nats. The
  gradient reaches the encoder (through z_t and the terminal KL); any other
  weighting would let the encoder hide information where the loss looks away.
- the DECODER, on pixels, conditioned on z0 by concatenation (UNet
  cond_channels), with the reweighted ELBO
      L_x = c_lf * -dlambda_x/dt * 1/2 * sigmoid(b - lambda_x) * ||eps - eps_hat||^2  (summed over pixel dims)
  (sigmoid(b - lambda), not the main text's typo: low-noise levels are discounted).

Choices (not fixed by the paper):
- The optimiser sees (L_z + L_x) / (C*H*W), i.e. nats per pixel dimension, so
  the learning rate does not depend on the image size; both terms stay sums
  in nats, so the loss factor keeps its meaning. Logged terms are unscaled.
- The decoder uses v-prediction by default (decoder_diffusion.parameterization).
  The loss is the same eps-space ELBO term either way; v keeps the untrained
  network's error small at the very noisy end, where -dlambda/dt of the cosine
  schedule is ~e^7.5 and an eps-predictor's initial error would dominate.
- The prior uses eps-prediction on the linear schedule (-dlambda/dt constant).
- Demo defaults (config.py): b = 2, c_lf = 3. At 16x16 with ~600 steps the
  paper's b = 0, c_lf = 1.5 lets the encoder shrink its latent to ~0.02 bits/px
  before the decoder learns to use it (posterior collapse); a higher b counts
  more of the low-noise decoder loss, a higher c_lf buys more bits.
- Stage 2 trains on the clean latents over the full schedule and samples from
  t=1 down to the t where its schedule reaches logsnr_z0 (the marginals below
  logsnr_z0 are those of z0, so this models z0); latents are not rescaled, so
  the noise level z0 was trained with stays exact.
- `features(x)` (linear probe) is the FLATTENED clean latent, (B, C_z*s*s):
  with a 4-channel grid, pooling would leave 4 numbers.
- bits = nats / ln 2; bits per pixel = bits / (H*W) (grey or colour alike).

Stage 2 (`UlBase`): a larger base model on the frozen encoder's clean latents
with sigmoid weighting (the ELBO-trained prior samples poorly). Sampling:
z_1 ~ N(0, I) -> DDIM down to logsnr_z0 (return_="z") -> decoder DDIM from
pure noise conditioned on that z0 -> image (`generate`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from diffrep.config import ConfigError, UlStage1Config, UlStage2Config
from diffrep.diffusion import (NATS_PER_BIT, Schedule, add_noise, ddim_sample, make_schedule, prior_kl_terminal,
                               schedule_of, t_for_logsnr, training_losses)
from diffrep.models.artifact import register
from diffrep.nn import ResNetEncoder, UNet


def prior_nats(denoise_fn, z_clean: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: Schedule,
               parameterization: str = "eps") -> torch.Tensor:
    """One-sample estimate of the latent's bitrate in nats per example (B,): ELBO diffusion term + terminal KL.

    denoise_fn(z_t, logsnr) predicts `parameterization`; schedule runs from logsnr_z0 (t=0) to logsnr_z1 (t=1).
    """
    out = training_losses(denoise_fn, z_clean, t, schedule, parameterization=parameterization,
                          weighting="elbo", eps=eps)
    return out["loss"] + prior_kl_terminal(z_clean, schedule.logsnr_min)


class UnifiedLatents(nn.Module):
    """Stage 1: encoder + latent diffusion prior (ELBO) + pixel diffusion decoder (sigmoid-weighted)."""

    prior_parameterization = "eps"

    def __init__(self, cfg: UlStage1Config, image_shape: tuple[int, int, int]):
        super().__init__()
        C, H, W = image_shape
        if H != W:
            raise ValueError(f"Unified Latents expects square images, got {H}x{W}")
        if not cfg.logsnr_z1 < cfg.logsnr_z0:
            raise ConfigError(f"ul.stage1: logsnr_z1 ({cfg.logsnr_z1}) must be below logsnr_z0 ({cfg.logsnr_z0})")
        d = cfg.decoder_diffusion
        if d.weighting not in ("sigmoid", "elbo"):
            raise ConfigError(f"ul.stage1.decoder_diffusion.weighting must be 'sigmoid' (or 'elbo'), got {d.weighting!r}: "
                             "the loss factor only means something when the decoder loss is a sum in nats")
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        self.encoder = ResNetEncoder.from_config(cfg.encoder, C, H, output="grid", grid_channels=cfg.latent_channels)
        self.latent_shape = self.encoder.output_shape  # (C_z, s, s)
        c_z, s = cfg.latent_channels, self.latent_shape[-1]
        self.prior = UNet.from_config(cfg.prior, c_z, c_z, s)
        self.decoder = UNet.from_config(cfg.decoder, C, C, H, cond_channels=c_z)
        self.prior_schedule = make_schedule("linear_logsnr", logsnr_min=cfg.logsnr_z1, logsnr_max=cfg.logsnr_z0)
        self.schedule = schedule_of(d)
        self.pixels = H * W  # bits per pixel divide by this
        self.dims = C * H * W  # the optimiser's loss is per pixel dimension

    # ------------------------------------------------------------ pieces
    def noisy_latent(self, z_clean: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z0 = alpha0 z_clean + sigma0 eps at the fixed level logsnr_z0."""
        return add_noise(z_clean, self.cfg.logsnr_z0, eps)

    def rate_nats(self, z_clean: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The prior's bitrate bound (B,) in nats, one (t, eps) sample per example."""
        return prior_nats(self.prior, z_clean, t, eps, self.prior_schedule, self.prior_parameterization)

    def decoder_losses(self, x: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict:
        d = self.cfg.decoder_diffusion
        return training_losses(lambda x_t, logsnr: self.decoder(x_t, logsnr, cond=z0), x, t, self.schedule,
                               parameterization=d.parameterization, weighting=d.weighting,
                               sigmoid_bias=d.sigmoid_bias, eps=eps)

    # ------------------------------------------------------------ training
    def forward(self, batch: dict[str, torch.Tensor], rng):
        x = batch["images"]  # (B, C, H, W) in [-1, 1]
        z_clean = self.encoder(x)  # (B, C_z, s, s)
        z0 = self.noisy_latent(z_clean, rng.randn(*self.latent_shape))
        l_z = self.rate_nats(z_clean, rng.rand(), rng.randn(*self.latent_shape))  # (B,) nats
        dec = self.decoder_losses(x, z0, rng.rand(), rng.randn(*self.image_shape))
        l_x = self.cfg.loss_factor * dec["loss"]  # (B,) nats, reweighted
        loss = (l_z + l_x).mean() / self.dims
        terms = {
            "bits_per_pixel": (l_z.mean() / NATS_PER_BIT / self.pixels).detach(),
            "prior_nats": l_z.mean().detach(),
            "decoder_nats": l_x.mean().detach(),
            "decoder_mse": dec["mse"].mean().detach(),
            "latent_std": z_clean.detach().std(),
        }
        return loss, terms

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> clean latent grid (B, C_z, s, s)."""
        return self.encoder(x)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Linear-probe features: the flattened clean latent (B, C_z*s*s)."""
        return self.encoder(x).flatten(1)

    @torch.no_grad()
    def decode(self, z0: torch.Tensor, *, noise: torch.Tensor | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM from pure noise conditioned on the NOISY latent z0 (B, C_z, s, s) -> images in [-1, 1]."""
        d = self.cfg.decoder_diffusion
        if noise is None:
            noise = torch.randn((z0.shape[0], *self.image_shape), generator=generator).to(z0.device)
        x = ddim_sample(lambda x_t, logsnr: self.decoder(x_t, logsnr, cond=z0), noise, self.schedule,
                        steps=steps or d.sample_steps, eta=d.eta, grid=d.sample_grid,
                        parameterization=d.parameterization, clip_x0=1.0, generator=generator if d.eta > 0 and noise.device.type == "cpu" else None)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, steps: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """encode -> z0 (one noise draw) -> decode from pure noise. `generator` (CPU) fixes both draws."""
        z_clean = self.encode(x)
        eps = torch.randn(z_clean.shape, generator=generator).to(z_clean.device)
        return self.decode(self.noisy_latent(z_clean, eps), steps=steps, generator=generator)

    @torch.no_grad()
    def bits_per_pixel(self, x: torch.Tensor, *, samples: int = 8, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image bitrate (B,) in bits/pixel, averaged over `samples` stratified times per image."""
        z_clean = self.encode(x)
        B = z_clean.shape[0]
        total = torch.zeros(B, device=z_clean.device)
        u = torch.rand((B,), generator=generator).to(z_clean.device)
        for k in range(samples):  # stratified t: each image covers [0, 1) evenly
            t = torch.remainder(u + k / samples, 1.0)
            eps = torch.randn(z_clean.shape, generator=generator).to(z_clean.device)
            total += self.rate_nats(z_clean, t, eps)
        return total / samples / NATS_PER_BIT / self.pixels


class UlBase(nn.Module):
    """Stage 2: a diffusion model on the frozen stage-1 clean latents, sigmoid-weighted, sampled down to logsnr_z0."""

    def __init__(self, cfg: UlStage2Config, latent_shape: tuple[int, int, int], logsnr_z0: float):
        super().__init__()
        d = cfg.diffusion
        if d.logsnr_max < logsnr_z0 or d.logsnr_min >= logsnr_z0:
            raise ConfigError(f"ul.stage2.diffusion: the schedule [{d.logsnr_min}, {d.logsnr_max}] must contain "
                             f"stage 1's latent noise level logsnr_z0={logsnr_z0} (sampling stops there)")
        self.cfg, self.latent_shape, self.logsnr_z0 = cfg, tuple(latent_shape), float(logsnr_z0)
        self.net = UNet.from_config(cfg.base, latent_shape[0], latent_shape[0], latent_shape[-1])
        self.schedule = schedule_of(d)
        # the time where the schedule reaches logsnr_z0: sampling returns z there, not a denoised latent
        self.t_end = float(t_for_logsnr(self.schedule, torch.tensor(self.logsnr_z0, dtype=torch.float64)))

    def forward(self, batch: dict[str, torch.Tensor], rng):
        z = batch["latents"]  # (B, C_z, s, s) clean latents from the frozen encoder
        d = self.cfg.diffusion
        out = training_losses(self.net, z, rng.rand(), self.schedule, parameterization=d.parameterization,
                              weighting=d.weighting, sigmoid_bias=d.sigmoid_bias, eps=rng.randn(*self.latent_shape))
        loss = out["loss"].mean() / math.prod(self.latent_shape)  # per latent dim, like stage 1's scale
        return loss, {"mse": out["mse"].mean().detach()}

    @torch.no_grad()
    def sample_z0(self, n: int, *, steps: int | None = None, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """z_1 ~ N(0, I) -> DDIM down to logsnr_z0 -> the noisy latent z0 (n, C_z, s, s), not denoised."""
        d = self.cfg.diffusion
        noise = torch.randn((n, *self.latent_shape), generator=generator).to(device)
        return ddim_sample(self.net, noise, self.schedule, steps=steps or d.sample_steps, eta=d.eta,
                           t_end=self.t_end, grid=d.sample_grid, parameterization=d.parameterization, return_="z",
                           generator=generator if d.eta > 0 and noise.device.type == "cpu" else None)


@torch.no_grad()
def generate(stage1: UnifiedLatents, base: UlBase, n: int, *, seed: int = 0, base_steps: int | None = None,
             decoder_steps: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """n images in [-1, 1]: base model -> z0 at logsnr_z0 -> stage-1 decoder. Same seed, same images (on CPU)."""
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    if abs(base.logsnr_z0 - stage1.cfg.logsnr_z0) > 1e-9:
        raise ValueError(f"generate: the base model samples to logsnr {base.logsnr_z0} but the decoder was trained "
                         f"on latents at {stage1.cfg.logsnr_z0}; retrain stage 2 on this stage 1")
    g = torch.Generator().manual_seed(seed)
    z0 = base.sample_z0(n, steps=base_steps, generator=g, device=device)
    return stage1.decode(z0, steps=decoder_steps, generator=g)


@register("ul_stage1")
def _build_stage1(section: dict, image_shape, extra: dict) -> UnifiedLatents:
    return UnifiedLatents(UlStage1Config.model_validate(section), image_shape)


@register("ul_stage2")
def _build_stage2(section: dict, latent_shape, extra: dict) -> UlBase:
    return UlBase(UlStage2Config.model_validate(section), latent_shape, extra["logsnr_z0"])
