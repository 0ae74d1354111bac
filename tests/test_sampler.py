"""The shared diffusion core's sampler: DDIM with an oracle denoiser, its noise levels, guidance."""
from __future__ import annotations

import math

import pytest
import torch

from diffrep.diffusion import (
    PARAMETERIZATIONS,
    alpha_sigma,
    cfg_combine,
    ddim_sample,
    from_x0_eps,
    guided_batched,
    make_schedule,
    tile_batch,
    to_x0_eps,
)


# ------------------------------------------------------------------ DDIM
def _oracle(x, kind):
    """Denoiser that knows the single data point x."""

    def fn(z, lam):
        a, s = alpha_sigma(lam)
        a, s = a.view(-1, *[1] * (z.ndim - 1)), s.view(-1, *[1] * (z.ndim - 1))
        eps = (z - a * x) / s
        return from_x0_eps(x.expand_as(z), eps, lam, kind)

    return fn


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("name", ["cosine", "inverted_cosine"])
def test_ddim_with_oracle_returns_the_data_point(kind, eta, name):
    x = torch.tensor([[0.7, -0.3], [1.2, 0.1]]).view(1, 2, 2)
    out = ddim_sample(_oracle(x, kind), (16, 2, 2), make_schedule(name), steps=20, eta=eta,
                      parameterization=kind, generator=torch.Generator().manual_seed(0))
    assert out.shape == (16, 2, 2)
    torch.testing.assert_close(out, x.expand(16, 2, 2), rtol=0, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_return_z_ends_at_the_right_noise_level(eta):
    sched = make_schedule("linear_logsnr", -15.0, 5.0)  # UL: t_end=0 is logsnr 5
    x = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4)
    z = ddim_sample(_oracle(x, "eps"), (20000, 4), sched, steps=10, eta=eta, return_="z",
                    generator=torch.Generator().manual_seed(0))
    a, s = alpha_sigma(torch.tensor(5.0))
    resid = z - a * x
    assert resid.mean().abs().item() < 4 * s.item() / math.sqrt(20000 * 4) + 1e-6
    assert resid.std().item() == pytest.approx(s.item(), rel=0.02)
    # partial range: stop at t_end=0.5 (logsnr -5)
    z = ddim_sample(_oracle(x, "v"), (20000, 4), sched, steps=5, eta=eta, t_end=0.5, return_="z",
                    parameterization="v", generator=torch.Generator().manual_seed(1))
    a, s = alpha_sigma(torch.tensor(-5.0))
    assert (z - a * x).std().item() == pytest.approx(s.item(), rel=0.02)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_gaussian_data_and_converges_with_steps(eta):
    """Data N(0, c^2): the exact denoiser is linear; sample std -> c as steps grow."""
    c = 0.5

    def denoise(z, lam):
        a, s = alpha_sigma(lam)
        a, s = a[:, None], s[:, None]
        x_hat = a * c * c * z / (a * a * c * c + s * s)
        return (z - a * x_hat) / s

    sched = make_schedule("cosine")
    errs = []
    for steps in (10, 40, 160):
        out = ddim_sample(denoise, (8000, 2), sched, steps=steps, eta=eta, generator=torch.Generator().manual_seed(0))
        errs.append(abs(out.std().item() - c))
    assert errs[2] < 0.02 and errs[2] < errs[1] < errs[0]


def test_ddim_determinism_and_generator():
    x = torch.zeros(1, 3)

    def noisy_model(z, lam):  # not an oracle, so the trajectory depends on the noise
        return 0.5 * z

    run = lambda seed, eta: ddim_sample(noisy_model, (4, 3), make_schedule("cosine"), steps=8, eta=eta,
                                        generator=torch.Generator().manual_seed(seed))
    for eta in (0.0, 1.0):
        torch.testing.assert_close(run(0, eta), run(0, eta), rtol=0, atol=0)
        assert not torch.allclose(run(0, eta), run(1, eta))
    assert not torch.allclose(run(0, 0.0), run(0, 1.0))
    # a given start tensor is used, not overwritten
    z1 = torch.randn(4, 3)
    keep = z1.clone()
    a = ddim_sample(_oracle(x, "eps"), z1, make_schedule("cosine"), steps=4)
    torch.testing.assert_close(z1, keep)
    torch.testing.assert_close(a, x.expand(4, 3), rtol=0, atol=1e-4)


def test_ddim_clip_x0_and_call_count():
    calls = []

    def big(z, lam):
        calls.append(lam)
        assert lam.shape == (5,) and lam.dtype == torch.float32
        return torch.full_like(z, 10.0)  # x0-prediction far outside [-1, 1]

    out = ddim_sample(big, (5, 2), make_schedule("cosine"), steps=6, parameterization="x0", clip_x0=1.0)
    assert torch.all(out <= 1.0) and len(calls) == 7  # steps + the final x0 prediction
    assert calls[0][0].item() == pytest.approx(-15.0) and calls[-1][0].item() == pytest.approx(15.0)
    calls.clear()
    ddim_sample(big, (5, 2), make_schedule("cosine"), steps=6, parameterization="x0", return_="z")
    assert len(calls) == 6


def test_ddim_bad_inputs():
    f = lambda z, lam: z
    s = make_schedule("cosine")
    with pytest.raises(ValueError, match="t_end < t_start"):
        ddim_sample(f, (2, 2), s, t_start=0.2, t_end=0.5)
    with pytest.raises(ValueError, match="return_"):
        ddim_sample(f, (2, 2), s, return_="both")
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(f, (2, 2), s, steps=0)
    with pytest.raises(ValueError, match="shape"):
        ddim_sample(lambda z, lam: z[:, :1], (2, 2), s)


# ------------------------------------------------------------------ guidance
def test_cfg_combine_and_guided_batched():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(cfg_combine(c, u, 0.3), 1.3 * c - 0.3 * u)
    torch.testing.assert_close(cfg_combine(c, u, 0.0), c)

    z, lam = torch.randn(3, 2), torch.zeros(3)
    seen = []

    def drop_fn(z2, lam2, drop):  # conditional: 2 z, unconditional: z + 1
        seen.append(drop.clone())
        return torch.where(drop[:, None], z2 + 1, 2 * z2)

    torch.testing.assert_close(guided_batched(drop_fn, 0.5)(z, lam), 1.5 * 2 * z - 0.5 * (z + 1))
    assert seen[-1].tolist() == [False] * 3 + [True] * 3
    torch.testing.assert_close(guided_batched(drop_fn, 0.0)(z, lam), 2 * z)
    assert seen[-1].tolist() == [False] * 3  # w = 0: one pass on the conditional rows only
    with pytest.raises(ValueError, match=">= 0"):
        guided_batched(drop_fn, -1.0)
    torch.testing.assert_close(tile_batch(torch.arange(2).view(2, 1), 4).flatten(), torch.tensor([0, 1, 0, 1]))


def test_guidance_is_the_same_in_every_parameterisation():
    """CFG weights sum to 1, so guiding eps, v or x0 predictions yields the same x0_hat."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 3, generator=g)
    lam = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    x_c, x_u = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    x0s = []
    for kind in PARAMETERIZATIONS:
        preds = []
        for x in (x_c, x_u):
            a, s = alpha_sigma(lam)
            eps = (z - a[:, None] * x) / s[:, None]
            preds.append(from_x0_eps(x, eps, lam, kind))
        x0s.append(to_x0_eps(cfg_combine(*preds, 0.7), z, lam, kind)[0])
    for x0 in x0s[1:]:
        torch.testing.assert_close(x0, x0s[0], rtol=0, atol=1e-4)


def _gaussian_denoiser(c: float):
    """The exact eps-denoiser of data N(0, c^2 I): E[x | z] = a c^2 z / (a^2 c^2 + s^2)."""
    def denoise(z, lam):
        a, s = alpha_sigma(lam)
        a, s = a[:, None], s[:, None]
        return (z - a * (a * c * c * z / (a * a * c * c + s * s))) / s
    return denoise


@pytest.mark.parametrize("grid", ["same", "cosine", "linear_logsnr"])
def test_sample_grid_variance_converges_to_the_datas(grid):
    """Every grid of the training schedule's endpoints: the sample std -> the data's (0.30) as steps grow.

    The inverted cosine's own grid gets there slowest (its last step stays long: logSNR 3.4 -> 15 at 400 steps).
    """
    c, sched = 0.30, make_schedule("inverted_cosine")
    errs = [abs(ddim_sample(_gaussian_denoiser(c), (6000, 2), sched, steps=n, grid=grid,
                            generator=torch.Generator().manual_seed(0)).std().item() - c) for n in (25, 100, 400, 1600)]
    assert errs[3] < errs[2] < errs[1] < errs[0]
    assert errs[3] < (0.03 if grid == "same" else 0.002)


def test_sample_grid_levels_and_same_is_todays_sampler():
    from diffrep.diffusion import SAMPLE_GRIDS, sample_logsnrs
    sched = make_schedule("inverted_cosine")
    same = sample_logsnrs(sched, 25, "same")
    assert same == sched(torch.linspace(1.0, 0.0, 26, dtype=torch.float64)).tolist()  # today's grid, bit for bit
    assert same[-2] == pytest.approx(1.9, abs=0.1) and same[-1] == 15.0  # the jump the other grids remove
    lin = sample_logsnrs(sched, 25, "linear_logsnr")
    assert lin[0] == same[0] and lin[-1] == same[-1] and max(abs(b - a - 1.2) for a, b in zip(lin, lin[1:])) < 1e-9
    cos = sample_logsnrs(sched, 25, "cosine")
    assert cos[0] == pytest.approx(-15.0) and cos[-1] == pytest.approx(15.0) and all(b > a for a, b in zip(cos, cos[1:]))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    f = _gaussian_denoiser(0.3)
    assert torch.equal(ddim_sample(f, x, sched, steps=25), ddim_sample(f, x, sched, steps=25, grid="same"))
    # the numbers: at 25 steps today's grid shrinks the std (0.18), a cosine grid much less (0.275)
    std = {g: ddim_sample(f, (20000, 2), sched, steps=25, grid=g, generator=torch.Generator().manual_seed(0)).std().item()
           for g in ("same", "cosine")}
    assert std["same"] == pytest.approx(0.18, abs=0.01) and std["cosine"] == pytest.approx(0.275, abs=0.01)
    with pytest.raises(ValueError, match="sample grid 'uniform' is unknown"):
        sample_logsnrs(sched, 5, "uniform")
    assert SAMPLE_GRIDS == ("same", "cosine", "linear_logsnr")
