"""The diffusion core shared by SODA, Unified Latents and l-DAE.

Everything is written in log-SNR: a schedule maps t in [0,1] to logsnr
(t=0 clean, t=1 noisy); alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).
Models only ever see (z_t, logsnr). l-DAE's variance-exploding process
(`LinearSigma`, `logsnr_of_sigma`, `ve_weighted`) is the exception; see schedules.py.
"""
from .gaussian import (
    PARAMETERIZATIONS,
    add_noise,
    alpha_sigma,
    broadcast_to,
    eps_error_scale,
    from_x0_eps,
    to_x0_eps,
)
from .guidance import cfg_combine, guided_batched, tile_batch
from .losses import NATS_PER_BIT, WEIGHTINGS, loss_weight, prior_kl_terminal, training_losses, ve_weighted
from .sampler import SAMPLE_GRIDS, ddim_sample, sample_logsnrs
from .schedules import SCHEDULES, LinearSigma, Schedule, logsnr_of_sigma, make_schedule, schedule_of, t_for_logsnr

__all__ = [
    "PARAMETERIZATIONS",
    "SCHEDULES",
    "WEIGHTINGS",
    "NATS_PER_BIT",
    "Schedule",
    "make_schedule",
    "LinearSigma",
    "logsnr_of_sigma",
    "ve_weighted",
    "schedule_of",
    "t_for_logsnr",
    "alpha_sigma",
    "add_noise",
    "broadcast_to",
    "to_x0_eps",
    "from_x0_eps",
    "eps_error_scale",
    "loss_weight",
    "training_losses",
    "prior_kl_terminal",
    "ddim_sample",
    "sample_logsnrs",
    "SAMPLE_GRIDS",
    "cfg_combine",
    "guided_batched",
    "tile_batch",
]
