"""Variance-preserving Gaussian diffusion in logSNR terms.

z_t = alpha x + sigma eps,  alpha^2 = sigmoid(logsnr),  sigma^2 = sigmoid(-logsnr),
v = alpha eps - sigma x  (Salimans & Ho).

A model predicts one of three linear parameterisations of (x, eps) given z_t:
"eps", "v" or "x0". Because alpha^2 + sigma^2 = 1, every conversion is an
affine map of the prediction, so any of them can be turned into (x0_hat,
eps_hat) and back without loss.

`logsnr` is either a scalar (0-d tensor or float) or a (B,) tensor matching
x's leading dimension; it is broadcast over x's trailing dimensions.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Parameterization = Literal["eps", "v", "x0"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "v", "x0")


def check_parameterization(kind: str) -> None:
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization {kind!r} is unknown; choose one of {PARAMETERIZATIONS}")


def broadcast_to(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Shape a scalar or (B,) tensor so it broadcasts against x (B, ...)."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(
            f"logsnr must be a scalar or shape (B,) = ({x.shape[0]},) to match x {tuple(x.shape)}, "
            f"got shape {tuple(v.shape)}"
        )
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def alpha_sigma(logsnr: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    logsnr = torch.as_tensor(logsnr)
    if not torch.is_floating_point(logsnr):
        logsnr = logsnr.to(torch.get_default_dtype())
    # exp(0.5*logsigmoid) keeps sigma accurate (not 0) at logsnr = +15 and beyond.
    return torch.exp(0.5 * F.logsigmoid(logsnr)), torch.exp(0.5 * F.logsigmoid(-logsnr))


def _coeffs(logsnr: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha, sigma = alpha_sigma(broadcast_to(logsnr, like))
    return alpha.to(like.dtype), sigma.to(like.dtype)


def add_noise(x: torch.Tensor, logsnr: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """z_t = alpha x + sigma eps, same shape as x."""
    if eps.shape != x.shape:
        raise ValueError(f"add_noise: eps shape {tuple(eps.shape)} must equal x shape {tuple(x.shape)}")
    alpha, sigma = _coeffs(logsnr, x)
    return alpha * x + sigma * eps


def to_x0_eps(
    pred: torch.Tensor, z_t: torch.Tensor, logsnr: torch.Tensor | float, kind: Parameterization | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a model output of parameterisation `kind` into (x0_hat, eps_hat)."""
    check_parameterization(kind)
    alpha, sigma = _coeffs(logsnr, z_t)
    if kind == "eps":
        return (z_t - sigma * pred) / alpha, pred
    if kind == "x0":
        return pred, (z_t - alpha * pred) / sigma
    # v: x = alpha z - sigma v, eps = sigma z + alpha v (exact since alpha^2 + sigma^2 = 1).
    return alpha * z_t - sigma * pred, sigma * z_t + alpha * pred


def from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor | float, kind: Parameterization | str
) -> torch.Tensor:
    """The regression target of parameterisation `kind` for clean x0 and noise eps."""
    check_parameterization(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    alpha, sigma = _coeffs(logsnr, x0)
    return alpha * eps - sigma * x0


def eps_error_scale(logsnr: torch.Tensor, kind: Parameterization | str) -> torch.Tensor:
    """s with ||eps_hat - eps||^2 = s * ||pred - target||^2 for parameterisation `kind`.

    eps: 1; v: alpha^2 (eps_hat - eps = alpha (v_hat - v)); x0: exp(logsnr)
    (eps_hat - eps = -(alpha/sigma)(x0_hat - x)). Using it avoids the
    cancellation of recomputing eps_hat from z_t at extreme logSNR.
    """
    check_parameterization(kind)
    logsnr = torch.as_tensor(logsnr)
    if kind == "eps":
        return torch.ones_like(logsnr)
    if kind == "v":
        return torch.sigmoid(logsnr)
    return torch.exp(logsnr)
