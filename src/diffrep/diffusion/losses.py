"""Diffusion training losses, written once in logSNR terms (DiT-style `training_losses`).

The model only ever sees (z_t, logsnr) and its conditions; t and the schedule
stay here. Weightings (per example, shape (B,)):

- "plain":   mean over dims of (pred - target)^2 for the parameterisation's own
             target (eps-, v- or x0-MSE), weight 1. DDPM/DiT's "simple" loss.
- "elbo":    0.5 * (-dlogsnr/dt) * SUM over dims ||eps - eps_hat||^2: the
             diffusion part of the continuous-time VDM bound, in nats per
             example. A bit count, so it always sums over dimensions; add
             `prior_kl_terminal` (and a reconstruction term if any) for the full
             bound; divide by ln 2 for bits.
- "sigmoid": 0.5 * (-dlogsnr/dt) * sigmoid(sigmoid_bias - logsnr) * SUM over dims
             ||eps - eps_hat||^2 (Kingma & Gao 2023). It also SUMS over dims, so
             it is in the same units as "elbo" (a reweighted ELBO): Unified
             Latents adds it to the latent ELBO, and the loss factor is only
             meaningful when both terms are sums. sigmoid(b - logsnr) -> 1 at
             high noise and discounts the low-noise end.

Always returned, whatever the weighting: "mse" (the plain loss, for logging)
and "eps_sq_sum" (sum over dims of ||eps - eps_hat||^2, for ELBO bookkeeping).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F

from .gaussian import add_noise, broadcast_to, check_parameterization, eps_error_scale, from_x0_eps, to_x0_eps
from .schedules import Schedule

Weighting = Literal["plain", "elbo", "sigmoid"]
WEIGHTINGS: tuple[str, ...] = ("plain", "elbo", "sigmoid")


def loss_weight(
    logsnr: torch.Tensor, dlogsnr_dt: torch.Tensor, weighting: Weighting | str, sigmoid_bias: float = 0.0
) -> torch.Tensor:
    """Factor w with loss = w * eps_sq_sum for "elbo" / "sigmoid" (shape of logsnr)."""
    if weighting == "elbo":
        return -0.5 * dlogsnr_dt
    if weighting == "sigmoid":
        return -0.5 * dlogsnr_dt * torch.sigmoid(sigmoid_bias - logsnr)
    raise ValueError(f"loss_weight: weighting {weighting!r} has no eps-space weight; use 'elbo' or 'sigmoid'")


def ve_weighted(loss: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A per-example x0 loss (B,) of a variance-exploding input times l-DAE's lambda_t = 1 / (1 + sigma^2).

    lambda_t = sigmoid(logsnr) = alpha^2 of the VP process at the same logSNR. Since x - x0_hat =
    sigma (eps_hat - eps), this is sigmoid(-logsnr) * ||eps - eps_hat||^2: a sigmoid weighting with
    bias 0 but without the ELBO's -dlogsnr/dt factor, so unlike "sigmoid" it is not a reweighted ELBO.
    """
    return loss / (1.0 + sigma.float().square())


def training_losses(
    model_fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    *,
    parameterization: str = "eps",
    weighting: Weighting | str = "plain",
    sigmoid_bias: float = 0.0,
    eps: torch.Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Noise x at times t, call model_fn(z_t, logsnr, **cond), score the prediction.

    x: (B, ...) clean data; t: (B,) in [0, 1]. Returns per-example (B,) tensors
    "loss" (weighted, see module docstring), "mse", "eps_sq_sum", "logsnr",
    and the (B, ...) tensors "x0_hat" and "z_t" (for logging / reconstruction).
    Take `.mean()` of "loss" for the optimiser.
    """
    check_parameterization(parameterization)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is unknown; choose one of {WEIGHTINGS}")
    if x.ndim < 2:
        raise ValueError(f"training_losses: x must be (B, ...) with at least one data dim, got shape {tuple(x.shape)}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"training_losses: t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    if eps is None:
        eps = torch.randn_like(x)
    t = t.float()  # float32 t even for low-precision x: logSNR near the ends needs it
    logsnr = schedule(t)  # (B,) float32
    z_t = add_noise(x, logsnr, eps)
    pred = model_fn(z_t, logsnr, **(cond or {}))
    if pred.shape != x.shape:
        raise ValueError(f"model_fn returned shape {tuple(pred.shape)}, expected x's shape {tuple(x.shape)}")
    target = from_x0_eps(x, eps, logsnr, parameterization)
    x0_hat, _ = to_x0_eps(pred, z_t, logsnr, parameterization)

    sq = (pred - target).float().pow(2).flatten(1)  # (B, D)
    mse = sq.mean(1)
    eps_sq_sum = eps_error_scale(logsnr.float(), parameterization) * sq.sum(1)
    if weighting == "plain":
        loss = mse
    else:
        loss = loss_weight(logsnr.float(), schedule.dlogsnr_dt(t), weighting, sigmoid_bias) * eps_sq_sum
    return {"loss": loss, "mse": mse, "eps_sq_sum": eps_sq_sum, "logsnr": logsnr, "x0_hat": x0_hat, "z_t": z_t}


def prior_kl_terminal(x: torch.Tensor, logsnr_1: torch.Tensor | float) -> torch.Tensor:
    """KL(q(z_1 | x) || N(0, I)) in nats, summed over dims, per example (B,) float32.

    q(z_1|x) = N(alpha x, sigma^2 I): KL = 0.5 sum(alpha^2 x^2 + sigma^2 - 1 - log sigma^2).
    logsnr_1 is a scalar or (B,) (the schedule's value at t=1). Gradients flow into x.
    """
    # float64: at logsnr_1 = -15 the per-dim constant is ~alpha^4/2 ~ 5e-14, below float32's step.
    lam = broadcast_to(logsnr_1, x).to(torch.float64)
    a2 = torch.sigmoid(lam)
    log_s2 = F.logsigmoid(-lam)
    # sigma^2 - 1 = -alpha^2, written so the 1 - 1 cancellation never happens.
    per_dim = a2 * x.to(torch.float64).pow(2) - a2 - log_s2
    per_dim = per_dim.expand(x.shape)
    return (0.5 * per_dim.reshape(x.shape[0], -1).sum(1)).float()


NATS_PER_BIT = math.log(2.0)  # divide nats by this for bits
