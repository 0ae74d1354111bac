"""Noise schedules as functions `t -> logSNR`.

Time t lies in [0, 1]: t=0 is the clean end (logSNR = logsnr_max), t=1 the
noisy end (logSNR = logsnr_min); every schedule is monotone decreasing in t.
With a variance-preserving process, alpha^2 = sigmoid(logsnr) and
sigma^2 = sigmoid(-logsnr) (see `gaussian.py`), so a schedule is all that
distinguishes SODA and Unified Latents at the diffusion level.

l-DAE stands apart (`LinearSigma` at the end of this file): its process is
variance-exploding, z = x + sigma_t eps with sigma_t linear in t and no input
scaling, its noise goes into the top-d patch-PCA components only (models/ldae.py),
and logSNR = -2 log sigma_t is +inf at t = 0, outside any finite
[logsnr_min, logsnr_max]. It shares the logSNR convention: the network is
conditioned on the same logSNR a VP process at that noise level would have
(the VP latent is the VE input times alpha = 1 / sqrt(1 + sigma^2)).

Every schedule and its derivative is evaluated in float64 internally and
returned in the input's dtype, so endpoint values (logSNR +-15) and the ELBO
weight -dlogsnr/dt are exact to the input's float precision.

Schedules
- "cosine": truncated cosine of simple diffusion / VDM++,
  logsnr(t) = -2 log tan(a t + b), with a, b such that logsnr(0) = logsnr_max
  and logsnr(1) = logsnr_min.
- "shifted_cosine": the cosine curve shifted by 2 log(1/shift) (shift > 1 is
  noisier, used at higher resolutions). Choice: the endpoints stay exactly at
  [logsnr_min, logsnr_max] by truncating the *unshifted* curve at
  [logsnr_min + 2 log shift, logsnr_max + 2 log shift] and then shifting. A
  clamp would instead create flat stretches where -dlogsnr/dt = 0 (ELBO weight
  zero) and the derivative would jump; this way the schedule stays smooth and
  strictly decreasing on all of [0, 1]. shift=1 equals "cosine".
- "inverted_cosine": SODA's inverse of the Nichol cosine schedule,
  abar(t) = (2(1+s)/pi) arccos(sqrt t) - s (abar(0) = 1 already, so the
  normalisation by abar(0) is the identity), s = 0.008,
  logsnr = log(abar / (1 - abar)). The raw curve is +inf at t=0 and crosses
  abar=0 just before t=1 (t ~ 0.99984), so it is clamped to
  [logsnr_min, logsnr_max]. The clamp is done in t (closed-form inverse), so
  the formula is exact inside [t_lo, t_hi] and the derivative is the true one
  of the clamped curve: zero on [0, t_lo) (t_lo ~ 2e-13 for logsnr_max=15,
  unreachable in float32 sampling) and on (t_hi, 1] (t_hi ~ 0.99984 for
  logsnr_min=-15).
- "linear_logsnr": logsnr_max + t (logsnr_min - logsnr_max) (Unified Latents:
  e.g. logsnr_max=5 at t=0, the fixed noise level of the latent, and
  logsnr_min=-15 at t=1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleName = Literal["cosine", "shifted_cosine", "inverted_cosine", "linear_logsnr"]
SCHEDULES: tuple[str, ...] = ("cosine", "shifted_cosine", "inverted_cosine", "linear_logsnr")

_INV_COS_S = 0.008  # Nichol & Dhariwal's offset, kept by SODA's inverted cosine


def _as_f64(t: torch.Tensor | float) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    if not torch.is_floating_point(t):
        raise TypeError(f"schedule: t must be a float tensor, got dtype {t.dtype}; pass e.g. t.float()")
    # MPS has no float64; stay in float32 there rather than fail.
    return t if t.device.type == "mps" else t.to(torch.float64)


def _out_dtype(t: torch.Tensor | float) -> torch.dtype:
    return t.dtype if torch.is_tensor(t) else torch.get_default_dtype()


def _inv_cos_abar(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar, 1 - abar) of the inverted cosine, each without catastrophic cancellation.

    abar = c (arccos(sqrt t) - th) with th = s/c, c = 2(1+s)/pi; the difference of
    angles is arcsin(sqrt(1-t) cos th - sqrt(t) sin th), accurate where abar -> 0
    (t -> 0.99984). 1 - abar = c arcsin(sqrt t), accurate where abar -> 1 (t -> 0).
    """
    c = 2.0 * (1.0 + _INV_COS_S) / math.pi
    th = _INV_COS_S / c
    abar = c * torch.arcsin(torch.sqrt(1.0 - t) * math.cos(th) - torch.sqrt(t) * math.sin(th))
    return abar, c * torch.arcsin(torch.sqrt(t))


@dataclass(frozen=True)
class Schedule:
    """A monotone decreasing map t in [0,1] -> logSNR. Build with `make_schedule`."""

    name: str
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule name {self.name!r} is unknown; choose one of {SCHEDULES}")
        if not (math.isfinite(self.logsnr_min) and math.isfinite(self.logsnr_max)):
            raise ValueError(f"schedule logsnr_min/logsnr_max must be finite, got {self.logsnr_min}, {self.logsnr_max}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"schedule needs logsnr_min < logsnr_max, got {self.logsnr_min} >= {self.logsnr_max}"
            )
        if not self.shift > 0:
            raise ValueError(f"schedule shift must be > 0, got {self.shift}")

    # ------------------------------------------------------------ cosine family
    def _cos_ab(self) -> tuple[float, float]:
        # logsnr = -2 log tan(u) - 2 log shift, u = a t + b; tan(u) = exp(-(logsnr + 2 log shift)/2).
        off = 2.0 * math.log(self.shift) if self.name == "shifted_cosine" else 0.0
        b = math.atan(math.exp(-0.5 * (self.logsnr_max + off)))
        a = math.atan(math.exp(-0.5 * (self.logsnr_min + off))) - b
        return a, b

    # ------------------------------------------------------------ inverted cosine
    def _inv_cos_t_bounds(self) -> tuple[float, float]:
        # Closed-form inverse: 1 - abar = c*arcsin(sqrt t)  =>  t = sin((1 - abar)/c)^2,
        # with 1 - abar = sigmoid(-logsnr) taken directly (no 1 - 1 cancellation at logsnr_max).
        c = 2.0 * (1.0 + _INV_COS_S) / math.pi

        def t_of(logsnr: float) -> float:
            return math.sin(1.0 / (1.0 + math.exp(logsnr)) / c) ** 2

        return t_of(self.logsnr_max), t_of(self.logsnr_min)

    # ------------------------------------------------------------ public
    def __call__(self, t: torch.Tensor | float) -> torch.Tensor:
        """logSNR at t; same shape as t, dtype of t (float64 inside)."""
        dtype, t64 = _out_dtype(t), _as_f64(t)
        if self.name in ("cosine", "shifted_cosine"):
            a, b = self._cos_ab()
            off = 2.0 * math.log(self.shift) if self.name == "shifted_cosine" else 0.0
            out = -2.0 * torch.log(torch.tan(a * t64 + b)) - off
        elif self.name == "linear_logsnr":
            out = self.logsnr_max + t64 * (self.logsnr_min - self.logsnr_max)
        else:  # inverted_cosine
            t_lo, t_hi = self._inv_cos_t_bounds()
            abar, one_minus = _inv_cos_abar(t64.clamp(t_lo, t_hi))
            out = (torch.log(abar) - torch.log(one_minus)).clamp(self.logsnr_min, self.logsnr_max)
            # Exact endpoint values in the clamped stretches (t_lo, t_hi carry float rounding).
            out = torch.where(t64 <= t_lo, self.logsnr_max, torch.where(t64 >= t_hi, self.logsnr_min, out))
        return out.to(dtype)

    def dlogsnr_dt(self, t: torch.Tensor | float) -> torch.Tensor:
        """d logSNR / dt at t (<= 0), closed form; same shape and dtype as t."""
        dtype, t64 = _out_dtype(t), _as_f64(t)
        if self.name in ("cosine", "shifted_cosine"):
            a, b = self._cos_ab()
            out = -4.0 * a / torch.sin(2.0 * (a * t64 + b))
        elif self.name == "linear_logsnr":
            out = torch.full_like(t64, self.logsnr_min - self.logsnr_max)
        else:  # inverted_cosine: d/dt logit(abar) = abar' / (abar (1 - abar))
            t_lo, t_hi = self._inv_cos_t_bounds()
            inside = (t64 > t_lo) & (t64 < t_hi)
            tc = t64.clamp(t_lo, t_hi)
            abar, one_minus = _inv_cos_abar(tc)
            dabar = -(1.0 + _INV_COS_S) / (math.pi * torch.sqrt(tc * (1.0 - tc)))
            out = torch.where(inside, dabar / (abar * one_minus), torch.zeros_like(t64))
        return out.to(dtype)


def make_schedule(
    name: ScheduleName | str, logsnr_min: float = -15.0, logsnr_max: float = 15.0, shift: float = 1.0
) -> Schedule:
    """Build a schedule by name (see the module docstring for the formulas)."""
    return Schedule(name=name, logsnr_min=float(logsnr_min), logsnr_max=float(logsnr_max), shift=float(shift))


def schedule_of(section) -> Schedule:
    """The schedule a diffusion config section names (its schedule, logsnr_min, logsnr_max and shift)."""
    return make_schedule(section.schedule, section.logsnr_min, section.logsnr_max, section.shift)


@dataclass(frozen=True)
class LinearSigma:
    """l-DAE's variance-exploding schedule: z_t = x + sigma_t eps, sigma_t = sigma_max * t (no input scaling).

    Computed in the input's dtype (no float64 detour): l-DAE's training numbers are defined by it.
    """

    sigma_max: float

    def __post_init__(self) -> None:
        if not self.sigma_max > 0:
            raise ValueError(f"LinearSigma: sigma_max must be > 0, got {self.sigma_max}")

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_max * t

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """logSNR at t: -2 log(sigma_max t), +inf at t = 0."""
        return logsnr_of_sigma(self.sigma(t))


def logsnr_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The logSNR of a variance-exploding input x + sigma eps: SNR = 1 / sigma^2, so -2 log sigma."""
    return -2.0 * torch.log(sigma)


def t_for_logsnr(schedule: Schedule, logsnr: torch.Tensor | float, iters: int = 60) -> torch.Tensor:
    """Invert a schedule by bisection: the t in [0, 1] with schedule(t) = logsnr.

    Batched over any shape. Targets outside [logsnr_min, logsnr_max] give the
    nearer endpoint (0 or 1). 60 halvings reach float64 resolution.
    """
    target = _as_f64(logsnr)
    lo = torch.zeros_like(target)
    hi = torch.ones_like(target)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        # Decreasing schedule: logsnr(mid) > target means the answer lies later in t.
        later = schedule(mid) > target
        lo = torch.where(later, mid, lo)
        hi = torch.where(later, hi, mid)
    return (0.5 * (lo + hi)).to(_out_dtype(logsnr))
