"""l-DAE: a denoising autoencoder in a patch-PCA latent (Chen, Liu, Xie, He 2024; docs/methods.md#l-dae).

Choices, and why (the paper states the mechanism; [choice] marks what it leaves open):
- Tokenizer: patch PCA (models/pca.py), fitted once on `pca_fit_patches` random grid
  patches of the training images, never trained. Its latent is *standardised*: each
  coefficient is divided by its std on the fitting patches, so it has unit variance
  and sigma has the same meaning for every component [choice; docs/methods.md#l-dae].
- Noise: z = encode(x) (B, N, D); the top d coefficients get sigma_t * eps, the rest
  are dropped; the network input is decode(z[:d] + sigma_t eps) (the paper's
  V_d^T (V_d x + sigma eps), gamma = 1, no input scaling). So the input carries no
  information beyond d, and the tail of the image must be *predicted*: that is what
  the rest_weight term trains. sigma_t = sigma_max * t, t ~ U(0, 1), sigma_max = sqrt(2):
  the core's variance-exploding `LinearSigma` (diffusion/schedules.py, which says why l-DAE
  cannot use the VP `add_noise`).
- noise_space "pixel" (the ablation, the paper's no-tokenizer DiT row): input = x + sigma_t eps,
  the full image with isotropic pixel noise; target, loss and network unchanged.
- Target: the clean image x. Loss on the residual r = x_hat - x in *orthonormal* PCA
  coordinates (a rotation of each centred patch, so with all weights 1 it is exactly
  the pixel MSE): weight 1 on components < d, rest_weight on the others, mean over
  tokens and components, times lambda_t = 1 / (1 + sigma_t^2) per sample (`ve_weighted`).
- Conditioning: the ViT sees log-SNR = -2 log sigma_t (`logsnr_of_sigma`; +inf at sigma = 0; the
  embedding maps it to a bounded time), so one embedding serves every model here.
- Features: the clean image through the same input path with no noise added (the
  top-d projection in latent mode), the ViT conditioned on the small fixed noise
  level `feature_logsnr`, encoder tokens (first depth // 2 blocks), then either
  average-pooled -> (B, dim) as in the paper, or flattened -> (B, N * dim)
  (`feature_pool`). Deterministic: no noise is drawn [choice].
"""
from __future__ import annotations

import torch
import torch.nn as nn

from diffrep.config import ConfigError, LdaeConfig
from diffrep.data.views import augment
from diffrep.diffusion import LinearSigma, logsnr_of_sigma, ve_weighted
from diffrep.models.artifact import register
from diffrep.models.pca import PatchPCA
from diffrep.nn.vit import ViT, patchify


class Ldae(nn.Module):
    def __init__(self, cfg: LdaeConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        C, H, W = image_shape
        v = cfg.vit
        if H != W:
            raise ValueError(f"l-DAE expects square images, got {H}x{W}")
        D = C * v.patch_size**2
        if not 1 <= cfg.pca_dim <= D:
            raise ConfigError(f"ldae.pca_dim={cfg.pca_dim} must be in [1, {D}] (= channels * patch_size^2 = {C}*{v.patch_size}^2)")
        if v.dim % v.heads:
            raise ConfigError(f"ldae.vit.heads={v.heads} must divide ldae.vit.dim={v.dim}")
        self.cfg, self.image_shape, self.d = cfg, (C, H, W), cfg.pca_dim
        self.schedule = LinearSigma(cfg.sigma_max)
        self.tokenizer = PatchPCA(C, v.patch_size)
        self.net = ViT(C, H, patch_size=v.patch_size, dim=v.dim, depth=v.depth, heads=v.heads, mlp_ratio=v.mlp_ratio)
        w = torch.full((D,), float(cfg.rest_weight))
        w[: cfg.pca_dim] = 1.0
        self.register_buffer("loss_weights", w, persistent=False)  # (D,), a function of the config

    # ------------------------------------------------------------ the noising path
    def fit_tokenizer(self, images: torch.Tensor, seed: int = 0) -> None:
        """Fit the patch PCA on training images (N, C, H, W) in [-1, 1] (a tensor or a memory-mapped ImageRows)."""
        g = torch.Generator().manual_seed(seed)
        images = images.cpu() if isinstance(images, torch.Tensor) else images
        self.tokenizer.fit_(images, self.cfg.pca_fit_patches, generator=g, standardize=self.cfg.standardize)

    def noisy_input(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Clean x (B, C, H, W), sigma (B,), eps (B, C, H, W) ~ N(0, I) -> the network input (B, C, H, W)."""
        if self.cfg.noise_space == "pixel":
            return x + sigma.reshape(-1, 1, 1, 1).to(x.dtype) * eps
        z = self.tokenizer.encode(x)[..., : self.d]  # (B, N, d), standardised
        noise = patchify(eps, self.tokenizer.patch_size)[..., : self.d]  # (B, N, d), iid N(0, 1)
        return self.tokenizer.decode(z + sigma.reshape(-1, 1, 1).to(x.dtype) * noise, self.image_shape)

    def residual_loss(self, pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,): weighted squared residual in orthonormal PCA coordinates, times 1/(1+sigma^2)."""
        c = self.tokenizer.coords(pred.float() - x.float(), centre=False)  # (B, N, D)
        return ve_weighted((c.square() * self.loss_weights).mean(dim=(1, 2)), sigma)

    # ------------------------------------------------------------ training
    def forward(self, batch: dict[str, torch.Tensor], rng):
        x = batch["images"]  # (B, C, H, W) in [-1, 1]
        if self.cfg.augment is not None:
            x = augment(x, self.cfg.augment, rng)
        sigma = self.schedule.sigma(rng.rand().to(x.device))  # (B,)
        x_in = self.noisy_input(x, sigma, rng.randn(*x.shape[1:]).to(x.device))
        pred = self.net(x_in, logsnr_of_sigma(sigma))
        loss = self.residual_loss(pred, x, sigma).mean()
        return loss, {"mse": (pred.float() - x.float()).square().mean().detach()}

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def encoder_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Clean images (B, C, H, W) in [-1, 1] -> encoder tokens (B, N, dim) at the fixed small noise level."""
        zero = torch.zeros(x.shape[0], device=x.device)
        x_in = self.noisy_input(x, zero, torch.zeros_like(x))
        return self.net.encode(x_in, torch.full_like(zero, self.cfg.feature_logsnr))

    @staticmethod
    def pool(tokens: torch.Tensor, how: str) -> torch.Tensor:
        """(B, N, dim) -> (B, dim) averaged (the paper) or (B, N * dim) flattened (keeps the layout)."""
        return tokens.mean(dim=1) if how == "mean" else tokens.flatten(1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Clean images (B, C, H, W) in [-1, 1] -> probe features, pooled as `ldae.feature_pool` says."""
        return self.pool(self.encoder_tokens(x), self.cfg.feature_pool)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One-step denoising: clean x, sigma (B,), eps like x -> (network input, predicted clean image)."""
        x_in = self.noisy_input(x, sigma, eps)
        return x_in, self.net(x_in, logsnr_of_sigma(sigma))


@register("ldae")
def _build(section: dict, image_shape, extra: dict) -> Ldae:
    return Ldae(LdaeConfig.model_validate(section), image_shape)
