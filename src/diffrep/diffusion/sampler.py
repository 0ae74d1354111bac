"""DDIM sampling (Song et al. 2021) in logSNR terms, eta from deterministic to ancestral.

One step from the noisier level s to the cleaner level t (logsnr_t > logsnr_s):
    x0_hat, eps_hat = to_x0_eps(denoise_fn(z_s, logsnr_s))
    c^2 = eta^2 * sigma_t^2 * (1 - exp(logsnr_s - logsnr_t))   # DDPM posterior variance at eta=1
    z_t = alpha_t x0_hat + sqrt(sigma_t^2 - c^2) eps_hat + c * noise
sigma_t^2 (1 - SNR_s/SNR_t) is the variance of q(z_t | z_s, x) (VDM), so eta=1
is the ancestral DDPM sampler and eta=0 the deterministic DDIM ODE step.

The grid of noise levels (`grid`, a model's `diffusion.sample_grid`) runs
between the schedule's logSNR at t_start and at t_end:
  "same"           uniform in t on the training schedule (the default: for the
                   inverted cosine at 25 steps the last step jumps from logSNR
                   1.9 to 15);
  "cosine"         uniform in t on a cosine schedule with those endpoints;
  "linear_logsnr"  uniform in logSNR.
The training schedule only sets the endpoints of the other two. Function
evaluations: `steps` for return_="z", one more for return_="x0" (the
denoiser's x0 prediction at t_end).
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch

from .gaussian import check_parameterization, to_x0_eps
from .schedules import Schedule, make_schedule

SAMPLE_GRIDS: tuple[str, ...] = ("same", "cosine", "linear_logsnr")

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _alpha_sigma(logsnr: float) -> tuple[float, float]:
    # sqrt(sigmoid(+-l)) via a stable log-sigmoid, in Python floats (no device sync per step).
    def log_sigmoid(v: float) -> float:
        return -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))

    return math.exp(0.5 * log_sigmoid(logsnr)), math.exp(0.5 * log_sigmoid(-logsnr))


def sample_logsnrs(schedule: Schedule, steps: int, grid: str = "same", t_start: float = 1.0,
                   t_end: float = 0.0) -> list[float]:
    """The steps + 1 logSNR levels DDIM visits, noisiest first, as Python floats (see the module docstring)."""
    if grid not in SAMPLE_GRIDS:
        raise ValueError(f"sample grid {grid!r} is unknown; choose one of {SAMPLE_GRIDS}")
    ts = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    lams = schedule(ts)
    lo, hi = float(lams[0]), float(lams[-1])
    if grid == "same" or not lo < hi:  # a degenerate range (both ends in a clamp) has one grid only
        return lams.tolist()
    if grid == "cosine":
        return make_schedule("cosine", lo, hi)(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).tolist()
    return torch.linspace(lo, hi, steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def ddim_sample(
    denoise_fn: DenoiseFn,
    shape_or_noise: Sequence[int] | torch.Tensor,
    schedule: Schedule,
    *,
    steps: int = 50,
    eta: float = 0.0,
    t_start: float = 1.0,
    t_end: float = 0.0,
    grid: str = "same",
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
    return_: Literal["x0", "z"] = "x0",
    clip_x0: float | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample by DDIM from t_start down to t_end.

    denoise_fn(z_t, logsnr) -> prediction of kind `parameterization`; logsnr is
    a (B,) float32 tensor. Close over conditions (and guidance, see
    `guidance.guided_batched`) in denoise_fn.
    shape_or_noise: a shape -> z at t_start ~ N(0, I) (drawn with `generator`
    on `device`; the right start only when t_start ~ 1), or a tensor used as
    z at t_start (e.g. a noised input for partial sampling).
    return_: "x0" -> the denoiser's x0 prediction at t_end (images; t_end=0 is
    logsnr_max); "z" -> z at t_end, not denoised (Unified Latents samples
    latents down to logSNR 5 and decodes that noisy z).
    clip_x0: clamp x0_hat to [-clip_x0, clip_x0] at every step (eps_hat is
    recomputed to stay consistent with z).
    eta: 0 deterministic; 1 ancestral (DDPM posterior variance).
    grid: where the steps fall, "same" | "cosine" | "linear_logsnr" (module docstring).
    """
    check_parameterization(parameterization)
    if return_ not in ("x0", "z"):
        raise ValueError(f"ddim_sample: return_ must be 'x0' or 'z', got {return_!r}")
    if steps < 1:
        raise ValueError(f"ddim_sample: steps must be >= 1, got {steps}")
    if eta < 0:
        raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"ddim_sample: need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    if clip_x0 is not None and clip_x0 <= 0:
        raise ValueError(f"ddim_sample: clip_x0 must be > 0 or None, got {clip_x0}")

    if torch.is_tensor(shape_or_noise):
        z = shape_or_noise.clone()
    else:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        z = torch.randn(tuple(shape_or_noise), generator=generator, device=device, dtype=dtype)
    batch = z.shape[0]

    # The whole logSNR grid as Python floats up front: no host sync inside the loop.
    lams = sample_logsnrs(schedule, steps, grid, t_start, t_end)

    def predict(z: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        lam_b = torch.full((batch,), lam, device=z.device, dtype=torch.float32)  # (B,)
        pred = denoise_fn(z, lam_b)
        if pred.shape != z.shape:
            raise ValueError(f"denoise_fn returned shape {tuple(pred.shape)}, expected {tuple(z.shape)}")
        x0, eps = to_x0_eps(pred.to(z.dtype), z, lam, parameterization)
        if clip_x0 is not None:
            a, s = _alpha_sigma(lam)
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (z - a * x0) / s
        return x0, eps

    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="ddim", leave=False)
    for i in it:
        lam_s, lam_t = lams[i], lams[i + 1]
        x0, eps = predict(z, lam_s)
        a_t, s_t = _alpha_sigma(lam_t)
        # Posterior variance of q(z_t | z_s, x): sigma_t^2 (1 - SNR_s / SNR_t); clamp guards lam_s > lam_t rounding.
        var = eta**2 * s_t**2 * max(0.0, -math.expm1(lam_s - lam_t))
        z = a_t * x0 + math.sqrt(max(s_t**2 - var, 0.0)) * eps
        if var > 0:
            z = z + math.sqrt(var) * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    if return_ == "z":
        return z
    return predict(z, lams[-1])[0]
