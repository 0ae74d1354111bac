"""The shared diffusion core: schedules, Gaussian algebra, losses, l-DAE's VE process (DDIM and guidance: test_sampler.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrep.diffusion import (
    NATS_PER_BIT,
    LinearSigma,
    logsnr_of_sigma,
    schedule_of,
    ve_weighted,
    PARAMETERIZATIONS,
    SCHEDULES,
    add_noise,
    alpha_sigma,
    eps_error_scale,
    from_x0_eps,
    loss_weight,
    make_schedule,
    prior_kl_terminal,
    t_for_logsnr,
    to_x0_eps,
    training_losses,
)

RANGES = [(-15.0, 15.0), (-15.0, 5.0), (-10.0, 10.0)]




def all_schedules():
    for name in SCHEDULES:
        for lo, hi in RANGES:
            for shift in ((1.0, 2.0, 0.5) if name == "shifted_cosine" else (1.0,)):
                yield make_schedule(name, lo, hi, shift)


def _inv_cos_reference(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    """SODA's inverted cosine straight from its formula, in numpy float64."""
    abar = (2 * (1 + s) / np.pi) * np.arccos(np.sqrt(t)) - s
    abar = abar / ((2 * (1 + s) / np.pi) * np.arccos(0.0) - s)  # normalise by abar(0)
    return np.log(abar / (1 - abar))


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize("sched", list(all_schedules()), ids=lambda s: f"{s.name}{s.logsnr_min:g}:{s.logsnr_max:g}x{s.shift:g}")
def test_schedule_endpoints_and_strict_monotonicity(sched):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = sched(t)
    assert lam.shape == t.shape and lam.dtype == torch.float64
    assert lam[0].item() == pytest.approx(sched.logsnr_max, abs=1e-9)
    assert lam[-1].item() == pytest.approx(sched.logsnr_min, abs=1e-9)
    assert torch.all(lam[1:] < lam[:-1]), "schedule must be strictly decreasing in t"
    assert torch.all((lam >= sched.logsnr_min - 1e-9) & (lam <= sched.logsnr_max + 1e-9))
    # float32 in -> float32 out, same shape, batched over any shape
    t32 = torch.rand(3, 5)
    assert sched(t32).shape == (3, 5) and sched(t32).dtype == torch.float32
    assert sched.dlogsnr_dt(t32).shape == (3, 5) and sched.dlogsnr_dt(t32).dtype == torch.float32


@pytest.mark.parametrize("sched", list(all_schedules()), ids=lambda s: f"{s.name}{s.logsnr_min:g}:{s.logsnr_max:g}x{s.shift:g}")
def test_dlogsnr_dt_matches_finite_differences(sched):
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    fd = (sched(t + h) - sched(t - h)) / (2 * h)
    d = sched.dlogsnr_dt(t)
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-6)
    assert torch.all(d < 0)


def test_cosine_family_is_minus_two_log_tan_of_affine_t():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for shift in (1.0, 2.0, 4.0):
        s = make_schedule("shifted_cosine", shift=shift)
        u = torch.atan(torch.exp(-0.5 * (s(t) + 2 * math.log(shift))))  # should be a t + b
        torch.testing.assert_close(u[1:] - u[:-1], (u[1] - u[0]).expand(10), rtol=0, atol=1e-12)
    torch.testing.assert_close(make_schedule("shifted_cosine", shift=1.0)(t), make_schedule("cosine")(t))
    # shift > 1 is noisier everywhere inside, about 2 log shift at the middle
    mid = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    assert torch.all(make_schedule("shifted_cosine", shift=2.0)(mid) < make_schedule("cosine")(mid))
    assert make_schedule("shifted_cosine", shift=2.0)(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(
        -2 * math.log(2.0), abs=0.01
    )


def test_linear_logsnr_is_linear():
    s = make_schedule("linear_logsnr", -15.0, 5.0)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(s(t), torch.tensor([5.0, 0.0, -5.0, -15.0]))
    torch.testing.assert_close(s.dlogsnr_dt(t), torch.full((4,), -20.0))


def test_inverted_cosine_matches_formula_and_reference_values():
    s = make_schedule("inverted_cosine")
    t = np.array([0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999])
    ref = _inv_cos_reference(t)
    got = s(torch.tensor(t)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    # docs/methods.md#schedules: about +2.7 at t=0.01, 0 at 0.5, -2.8 at 0.99
    vals = s(torch.tensor([0.01, 0.5, 0.99])).tolist()
    assert vals[0] == pytest.approx(2.7, abs=0.1)
    assert vals[1] == pytest.approx(0.0, abs=0.1)
    assert vals[2] == pytest.approx(-2.8, abs=0.1)
    # finite at both ends, clamped into the range, float32 too
    ends = s(torch.tensor([0.0, 1e-30, 1.0 - 1e-7, 1.0]))
    assert torch.isfinite(ends).all()
    assert ends.tolist()[0] == 15.0 and ends.tolist()[-1] == -15.0
    assert torch.isfinite(s.dlogsnr_dt(torch.tensor([0.0, 1.0]))).all()


def test_t_for_logsnr_inverts_every_schedule():
    lam = torch.tensor([-14.0, -5.0, 0.0, 2.7, 4.5], dtype=torch.float64)
    for sched in all_schedules():
        target = lam.clamp(sched.logsnr_min + 0.5, sched.logsnr_max - 0.5)
        t = t_for_logsnr(sched, target)
        assert torch.all((t >= 0) & (t <= 1))
        torch.testing.assert_close(sched(t), target, rtol=0, atol=1e-8)


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match="unknown"):
        make_schedule("karras")
    with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
        make_schedule("cosine", logsnr_min=5.0, logsnr_max=-5.0)
    with pytest.raises(ValueError, match="shift"):
        make_schedule("shifted_cosine", shift=0.0)
    with pytest.raises(TypeError, match="float"):
        make_schedule("cosine")(torch.tensor([0, 1]))


# ------------------------------------------------------------------ gaussian
def test_alpha_sigma_variance_preserving_and_accurate_at_extremes():
    lam = torch.linspace(-20, 20, 81, dtype=torch.float64)
    a, s = alpha_sigma(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(lam), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.log(a**2 / s**2), lam, rtol=0, atol=1e-9)
    a32, s32 = alpha_sigma(torch.tensor([15.0, -15.0]))
    # sigma at logsnr=15 is ~5.5e-4, not rounded to 0 (1 - alpha^2 would be)
    assert s32[0].item() == pytest.approx(math.sqrt(1 / (1 + math.exp(15))), rel=1e-5)
    assert a32[1].item() == pytest.approx(math.sqrt(1 / (1 + math.exp(15))), rel=1e-5)


def test_add_noise_broadcasts_per_example_logsnr():
    x = torch.randn(3, 2, 4, 4)
    eps = torch.randn_like(x)
    lam = torch.tensor([-3.0, 0.0, 4.0])
    z = add_noise(x, lam, eps)
    for i in range(3):
        a, s = alpha_sigma(lam[i])
        torch.testing.assert_close(z[i], a * x[i] + s * eps[i])
    with pytest.raises(ValueError, match="logsnr"):
        add_noise(x, torch.zeros(2), eps)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_parameterisation_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, generator=g)
    eps = torch.randn(6, 3, 5, generator=g)
    lam = torch.tensor([-6.0, -2.0, 0.0, 1.0, 3.0, 6.0])
    z = add_noise(x, lam, eps)
    target = from_x0_eps(x, eps, lam, kind)
    x0_hat, eps_hat = to_x0_eps(target, z, lam, kind)
    torch.testing.assert_close(x0_hat, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)
    # and back from (x0, eps) to the same target
    torch.testing.assert_close(from_x0_eps(x0_hat, eps_hat, lam, kind), target, rtol=0, atol=1e-5)
    # v = alpha eps - sigma x, by definition
    if kind == "v":
        a, s = alpha_sigma(lam)
        torch.testing.assert_close(target, a[:, None, None] * eps - s[:, None, None] * x)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_eps_error_scale_converts_squared_errors(kind):
    g = torch.Generator().manual_seed(1)
    x, eps, pred = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    lam = torch.tensor([-8.0, -1.0, 0.0, 2.0, 9.0], dtype=torch.float64)
    z = add_noise(x, lam, eps)
    _, eps_hat = to_x0_eps(pred, z, lam, kind)
    direct = (eps_hat - eps).pow(2).sum(1)
    via_scale = eps_error_scale(lam, kind) * (pred - from_x0_eps(x, eps, lam, kind)).pow(2).sum(1)
    torch.testing.assert_close(via_scale, direct, rtol=1e-9, atol=1e-9)


def test_unknown_parameterisation_is_an_error():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="parameterization"):
        to_x0_eps(x, x, 0.0, "score")


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("weighting", ["plain", "elbo", "sigmoid"])
def test_oracle_model_has_zero_loss(kind, weighting):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, 3, 3, generator=g)
    eps = torch.randn_like(x)
    t = torch.rand(8, generator=g) * 0.9 + 0.05
    sched = make_schedule("cosine")

    def oracle(z, lam):
        return from_x0_eps(x, eps, lam, kind)

    out = training_losses(oracle, x, t, sched, parameterization=kind, weighting=weighting, eps=eps)
    for key in ("loss", "mse", "eps_sq_sum", "logsnr"):
        assert out[key].shape == (8,)
    assert out["loss"].abs().max().item() < 1e-6
    assert out["eps_sq_sum"].abs().max().item() < 1e-6
    torch.testing.assert_close(out["x0_hat"], x, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["logsnr"], sched(t))


def test_loss_weights_match_their_formulas():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 4, generator=g)
    eps = torch.randn_like(x)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    sched = make_schedule("inverted_cosine")
    zero = lambda z, lam: torch.zeros_like(z)  # eps_hat = 0: eps_sq_sum = ||eps||^2

    out = {w: training_losses(zero, x, t, sched, weighting=w, sigmoid_bias=-1.0, eps=eps) for w in ("plain", "elbo", "sigmoid")}
    lam64 = sched(t.double())
    dl = sched.dlogsnr_dt(t.double())
    e2 = eps.double().pow(2).flatten(1)
    torch.testing.assert_close(out["plain"]["loss"].double(), e2.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["plain"]["eps_sq_sum"].double(), e2.sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["elbo"]["loss"].double(), 0.5 * (-dl) * e2.sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        out["sigmoid"]["loss"].double(), 0.5 * (-dl) * torch.sigmoid(-1.0 - lam64) * e2.sum(1), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(loss_weight(lam64, dl, "sigmoid", 2.0), -0.5 * dl / (1 + torch.exp(lam64 - 2.0)))
    with pytest.raises(ValueError, match="weighting"):
        training_losses(zero, x, t, sched, weighting="min_snr")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        training_losses(zero, x, t[:3], sched)


@pytest.mark.parametrize(
    "name,lo,hi", [("linear_logsnr", -15.0, 5.0), ("cosine", -10.0, 10.0), ("shifted_cosine", -10.0, 10.0), ("inverted_cosine", -5.0, 5.0)]
)
def test_elbo_matches_closed_form_and_is_schedule_invariant(name, lo, hi):
    """Data point x, model = exact denoiser of N(0, I) data: eps_hat = sigma z.

    Then x_hat = alpha z and E||x - x_hat||^2 = sigma^4 |x|^2 + alpha^2 sigma^2 D, so
    the diffusion loss 0.5 int e^l E||x - x_hat||^2 dl has the closed form
    0.5 [|x|^2 (s(hi) - s(lo)) + D (sp(hi) - s(hi) - sp(lo) + s(lo))]  (s = sigmoid,
    sp = softplus): the same for every schedule with the same endpoints.
    """
    n, x_pt = 40000, torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    x = x_pt.expand(n, 4)
    sched = make_schedule(name, lo, hi, shift=2.0)

    def gauss_denoiser(z, lam):
        return alpha_sigma(lam.double())[1][:, None] * z

    g = torch.Generator().manual_seed(4)
    t = torch.remainder(torch.rand(1, generator=g) + torch.arange(n) / n, 1.0)  # stratified: one t per 1/n
    eps = torch.randn(n, 4, generator=g, dtype=torch.float64)
    loss = training_losses(gauss_denoiser, x, t, sched, weighting="elbo", eps=eps)["loss"].double()
    hi_, lo_ = torch.tensor(hi, dtype=torch.float64), torch.tensor(lo, dtype=torch.float64)
    closed = 0.5 * (
        x_pt.pow(2).sum() * (torch.sigmoid(hi_) - torch.sigmoid(lo_))
        + 4 * (F.softplus(hi_) - torch.sigmoid(hi_) - F.softplus(lo_) + torch.sigmoid(lo_))
    )
    se = loss.std().item() / math.sqrt(n)
    assert abs(loss.mean().item() - closed.item()) < max(4 * se, 0.01 * closed.item())


def test_prior_kl_terminal_by_hand():
    x = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    lam = -2.0
    a2, s2 = 1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-2.0))
    by_hand = [0.5 * sum(a2 * v * v + s2 - 1 - math.log(s2) for v in row) for row in ([1, 2, -1], [0, 0, 0])]
    torch.testing.assert_close(prior_kl_terminal(x, lam), torch.tensor(by_hand), rtol=1e-6, atol=1e-9)
    # per-example logsnr, image-shaped x; tiny but positive at logsnr -15
    kl = prior_kl_terminal(torch.ones(2, 1, 2, 2), torch.tensor([-15.0, -2.0]))
    assert kl.shape == (2,) and 0 < kl[0].item() < 1e-5 and kl[1].item() > kl[0].item()
    # gradients reach x (UL: the encoder pays for the latent's terminal KL)
    xr = torch.randn(2, 3, requires_grad=True)
    prior_kl_terminal(xr, lam).sum().backward()
    torch.testing.assert_close(xr.grad, a2 * xr.detach())
    assert NATS_PER_BIT == pytest.approx(math.log(2))


# ------------------------------------------------------------------ l-DAE's variance-exploding process
def test_linear_sigma_closed_form():
    s = LinearSigma(math.sqrt(2))
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(s.sigma(t), math.sqrt(2) * t)
    lam = s(t)
    assert lam[0].item() == math.inf  # the clean end: no noise
    torch.testing.assert_close(lam[1:], torch.tensor([-2 * math.log(math.sqrt(2) / 4), math.log(2.0), -math.log(2.0)]))
    with pytest.raises(ValueError, match="sigma_max"):
        LinearSigma(0.0)


def test_ve_input_is_the_vp_latent_over_alpha_at_the_same_logsnr():
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.4])
    lam = logsnr_of_sigma(sigma)
    alpha = torch.sigmoid(lam).sqrt()[:, None]
    torch.testing.assert_close(add_noise(x, lam, eps), alpha * (x + sigma[:, None] * eps))
    torch.testing.assert_close(alpha[:, 0] ** 2, 1 / (1 + sigma**2))  # lambda_t of l-DAE is alpha^2


def test_ve_weighted_is_sigmoid_minus_logsnr_times_the_eps_error():
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.2, 0.7, 1.3])
    eps, eps_hat = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    x0_mse = (sigma[:, None] * (eps_hat - eps)).square().mean(1)  # x - x0_hat = sigma (eps_hat - eps)
    expected = torch.sigmoid(-logsnr_of_sigma(sigma)) * (eps - eps_hat).square().mean(1)
    torch.testing.assert_close(ve_weighted(x0_mse, sigma), expected)
    torch.testing.assert_close(ve_weighted(torch.ones(3), torch.zeros(3)), torch.ones(3))  # sigma 0: weight 1


def test_schedule_of_reads_a_config_section():
    from diffrep.config import DiffusionConfig

    d = DiffusionConfig(schedule="shifted_cosine", logsnr_min=-10.0, logsnr_max=12.0, shift=0.5)
    assert schedule_of(d) == make_schedule("shifted_cosine", -10.0, 12.0, 0.5)
