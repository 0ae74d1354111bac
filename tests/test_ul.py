"""Unified Latents (models/ul.py): the prior's bitrate bound, its units, the decoder weighting, sampling."""
import math

import pytest
import torch

from helpers import perturb

from diffrep.config import DiffusionConfig, EncoderConfig, UlStage1Config, UlStage2Config, UNetConfig
from diffrep.diffusion import make_schedule
from diffrep.models.ul import UlBase, UnifiedLatents, generate, prior_nats
from diffrep.train.rng import BatchRNG

IMAGE = (1, 8, 8)
TINY1 = UlStage1Config(
    latent_channels=2, loss_factor=1.7,
    encoder=EncoderConfig(width=8, depth=1, stages=2),  # 8x8 -> latent (2, 4, 4)
    prior=UNetConfig(channels=8, channel_mult=(1,), attn_resolutions=(), groups=4, heads=1),
    decoder=UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=(), groups=4, heads=1),
    decoder_diffusion=DiffusionConfig(schedule="cosine", parameterization="v", weighting="sigmoid",
                                      sigmoid_bias=-1.0, sample_steps=4),
)
TINY2 = UlStage2Config(base=UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=(2,), groups=4, heads=1),
                       diffusion=DiffusionConfig(schedule="cosine", parameterization="v", weighting="sigmoid",
                                                 sample_steps=4))


def images(n=4, seed=0):
    return torch.rand((n, *IMAGE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


class FixedRNG:
    """A BatchRNG stand-in with given times and noises (the order UnifiedLatents.forward draws them)."""

    def __init__(self, t, noises):
        self.t, self.noises = t, list(noises)

    def rand(self, *shape):
        return self.t.clone()

    def randn(self, *shape):
        return self.noises.pop(0)


# ---------------------------------------------------------------- the prior's ELBO: closed form
def _gaussian_prior_check(z_clean, s2, n=200_000, seed=0):
    """MC bitrate bound with the exact eps-denoiser for data z ~ N(0, s2 I) vs KL(q(z0|z) || p(z0))."""
    sched = make_schedule("linear_logsnr", logsnr_min=-15.0, logsnr_max=5.0)
    D = z_clean.numel()

    def optimal_eps(z_t, logsnr):  # E[eps | z_t] for z_t ~ N(0, alpha^2 s2 + sigma^2)
        a2 = torch.sigmoid(logsnr)[:, None].double()
        return ((1 - a2).sqrt() * z_t.double() / (a2 * s2 + 1 - a2)).to(z_t.dtype)

    g = torch.Generator().manual_seed(seed)
    t = torch.remainder(torch.rand(1, generator=g) + torch.arange(n) / n, 1.0)  # stratified, each t ~ U[0,1)
    z = z_clean.expand(n, D).double()
    eps = torch.randn(n, D, generator=g, dtype=torch.float64)
    est = prior_nats(optimal_eps, z, t.double(), eps, sched).mean().item()
    a2, s2_0 = 1 / (1 + math.exp(-5.0)), 1 / (1 + math.exp(5.0))
    v0 = a2 * s2 + s2_0  # the marginal variance of z0 per dim
    kl = 0.5 * sum((s2_0 + a2 * zi**2) / v0 - 1 - math.log(s2_0 / v0) for zi in z_clean.tolist())
    return est, kl


def test_prior_elbo_matches_closed_form_for_gaussian_latents():
    # With the exact denoiser the diffusion is the true reverse process, so the bound is tight:
    # weighted eps-MSE integral + terminal KL = KL(N(alpha0 z, sigma0^2) || N(0, alpha0^2 s2 + sigma0^2)) in nats.
    z_clean = torch.tensor([0.3, -1.2, 0.8, 2.0])
    est, kl = _gaussian_prior_check(z_clean, s2=1.0)
    assert kl > 5  # a few nats: a non-trivial check
    assert est == pytest.approx(kl, rel=0.02)
    assert est / math.log(2) == pytest.approx(kl / math.log(2), rel=0.02)  # bits


def test_prior_elbo_averages_to_the_mutual_information():
    # Over z ~ N(0, s2): E[KL] = I(z; z0) = D/2 log(1 + e^5 s2), the latent's true rate.
    s2, D = 0.25, 64
    z_clean = torch.randn(D, generator=torch.Generator().manual_seed(1)) * math.sqrt(s2)
    est, kl = _gaussian_prior_check(z_clean, s2=s2, n=20_000)
    mi = 0.5 * D * math.log(1 + math.exp(5.0) * s2)
    assert est == pytest.approx(kl, rel=0.02)
    assert est == pytest.approx(mi, rel=0.1)  # one draw of z: close to the average, not equal


# ---------------------------------------------------------------- units, noise level, gradients
def test_latent_noise_level_is_exact():
    a0, s0 = math.sqrt(1 / (1 + math.exp(-5))), math.sqrt(1 / (1 + math.exp(5)))  # alpha, sigma at logsnr 5
    assert (a0, s0) == (pytest.approx(0.99665, abs=1e-5), pytest.approx(0.08180, abs=1e-5))
    m = UnifiedLatents(TINY1, IMAGE)
    z, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.allclose(m.noisy_latent(z, eps), a0 * z + s0 * eps, atol=1e-6)
    assert m.prior_schedule(torch.tensor(0.0)).item() == pytest.approx(5.0)
    assert m.prior_schedule(torch.tensor(1.0)).item() == pytest.approx(-15.0)


def test_bits_units_nats_over_ln2_per_pixel():
    m = perturb(UnifiedLatents(TINY1, IMAGE), std=0.1)
    loss, terms = m({"images": images()}, BatchRNG(0, 0, 4))
    H, W = IMAGE[1:]
    assert terms["bits_per_pixel"].item() == pytest.approx(terms["prior_nats"].item() / math.log(2) / (H * W), rel=1e-6)
    # the optimiser's loss: both terms in nats, divided by the pixel dimensions
    assert loss.item() == pytest.approx((terms["prior_nats"] + terms["decoder_nats"]).item() / (H * W), rel=1e-5)
    # the eval estimate with one time sample is the same bound, in bits/px
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = images(2, seed=5)
    bpp = m.bits_per_pixel(x, samples=1, generator=g1)
    t = torch.rand(2, generator=g2)
    eps = torch.randn((2, *m.latent_shape), generator=g2)
    with torch.no_grad():
        nats = m.rate_nats(m.encode(x), t, eps)
    assert torch.allclose(bpp, nats / math.log(2) / (H * W), rtol=1e-5)


def test_gradients_reach_the_encoder_through_the_prior_alone():
    m = perturb(UnifiedLatents(TINY1, IMAGE), std=0.1)
    z = m.encoder(images())
    m.rate_nats(z, torch.rand(4), torch.randn(4, *m.latent_shape)).sum().backward()
    enc = [p.grad for p in m.encoder.parameters()]
    assert all(g is not None for g in enc) and sum(g.abs().sum() for g in enc) > 0
    assert all(p.grad is None for p in m.decoder.parameters())


# ---------------------------------------------------------------- the decoder weighting
def test_decoder_weight_is_lossfactor_sigmoid_b_minus_lambda():
    m = perturb(UnifiedLatents(TINY1, IMAGE), std=0.1)
    x = images()
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    eps0, eps_z, eps_x = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.randn(4, *IMAGE)
    _, terms = m({"images": x}, FixedRNG(t, [eps0, eps_z, eps_x]))
    # independent recomputation: v-prediction -> eps_hat, then the stated weight
    lam, dlam = m.schedule(t), m.schedule.dlogsnr_dt(t)
    a, s = torch.sigmoid(lam).sqrt()[:, None, None, None], torch.sigmoid(-lam).sqrt()[:, None, None, None]
    with torch.no_grad():
        z0 = m.noisy_latent(m.encoder(x), eps0)
        x_t = a * x + s * eps_x
        eps_hat = s * x_t + a * m.decoder(x_t, lam, cond=z0)
    sq = (eps_x - eps_hat).pow(2).flatten(1).sum(1)
    b, c_lf = TINY1.decoder_diffusion.sigmoid_bias, TINY1.loss_factor
    expected = (c_lf * -dlam / 2 * torch.sigmoid(b - lam) * sq).mean()
    assert terms["decoder_nats"].item() == pytest.approx(expected.item(), rel=1e-4)


# ---------------------------------------------------------------- training
def test_loss_falls_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    m = UnifiedLatents(TINY1, IMAGE)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x = images(4)
    losses = []
    for _ in range(30):
        loss, _ = m({"images": x}, BatchRNG(0, 0, 4))  # same t and noise every step: a fixed objective
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_stage2_loss_is_the_sigmoid_weighted_elbo_per_latent_dim():
    base = perturb(UlBase(TINY2, (2, 4, 4), logsnr_z0=5.0), std=0.1)
    z, t, eps = torch.randn(4, 2, 4, 4), torch.tensor([0.1, 0.4, 0.6, 0.9]), torch.randn(4, 2, 4, 4)
    loss, terms = base({"latents": z}, FixedRNG(t, [eps]))
    # independent recomputation: v-prediction -> eps_hat, weight -dlambda/dt / 2 * sigmoid(b - lambda)
    lam, dlam = base.schedule(t), base.schedule.dlogsnr_dt(t)
    a, s = torch.sigmoid(lam).sqrt()[:, None, None, None], torch.sigmoid(-lam).sqrt()[:, None, None, None]
    with torch.no_grad():
        z_t = a * z + s * eps
        v = base.net(z_t, lam)
        eps_hat = s * z_t + a * v
    b = TINY2.diffusion.sigmoid_bias
    expected = (-dlam / 2 * torch.sigmoid(b - lam) * (eps - eps_hat).pow(2).flatten(1).sum(1)).mean() / 32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert terms["mse"].item() == pytest.approx((v - (a * eps - s * z)).pow(2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- sampling
def test_stage2_sampling_shapes_and_determinism():
    s1 = perturb(UnifiedLatents(TINY1, IMAGE), std=0.1).eval()
    base = perturb(UlBase(TINY2, (2, 4, 4), 5.0), std=0.1).eval()
    assert base.schedule(torch.tensor(base.t_end, dtype=torch.float64)).item() == pytest.approx(5.0, abs=1e-6)
    a = generate(s1, base, 3, seed=7)
    assert a.shape == (3, *IMAGE) and a.abs().max() <= 1
    assert torch.equal(a, generate(s1, base, 3, seed=7))
    assert not torch.equal(a, generate(s1, base, 3, seed=8))
    z0 = base.sample_z0(5, generator=torch.Generator().manual_seed(0))
    assert z0.shape == (5, 2, 4, 4)
    rec = s1.reconstruct(images(2), generator=torch.Generator().manual_seed(0))
    assert rec.shape == (2, *IMAGE)
    assert s1.features(images(2)).shape == (2, 2 * 4 * 4)


# ---------------------------------------------------------------- bad input
def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="logsnr_z1"):
        UnifiedLatents(TINY1.model_copy(update={"logsnr_z1": 6.0}), IMAGE)
    with pytest.raises(ValueError, match="weighting"):
        UnifiedLatents(TINY1.model_copy(update={"decoder_diffusion": DiffusionConfig(weighting="plain")}), IMAGE)
    with pytest.raises(ValueError, match="square"):
        UnifiedLatents(TINY1, (1, 8, 4))
    with pytest.raises(ValueError, match="logsnr_z0"):
        UlBase(TINY2, (2, 4, 4), logsnr_z0=20.0)
    s1 = UnifiedLatents(TINY1.model_copy(update={"logsnr_z0": 10.0}), IMAGE)
    with pytest.raises(ValueError, match="retrain stage 2"):
        generate(s1, UlBase(TINY2, (2, 4, 4), 5.0), 2)


# ---------------------------------------------------------------- the two stages end to end (digits 8x8)
def test_stages_write_models_metrics_and_sample(prepared_digits, tmp_path):
    import argparse
    import shutil

    import numpy as np

    from diffrep.config import parse_config
    from diffrep.sample import main_sample, sample_ul
    from diffrep.stages import ul_stage1, ul_stage2

    src, _ = prepared_digits
    shutil.copytree(src / "data", tmp_path / "data")
    train = {"steps": 6, "batch_size": 16, "ckpt_every": 100, "log_every": 2}
    cfg = parse_config({"data": {"source": "digits", "image_size": 8}, "runtime": {"device": "cpu"}, "ul": {
        "stage1": {**TINY1.model_dump(mode="json"), "train": train, "eval_images": 20},
        "stage2": {**TINY2.model_dump(mode="json"), "train": train, "sample_images": 8}}}, "test")
    m1 = ul_stage1.run(cfg, tmp_path)
    assert m1["bits_per_image"] == pytest.approx(m1["bits_per_pixel"] * 64)  # 8x8 digits
    assert m1["test_bits_per_pixel"] == pytest.approx(m1["test_prior_nats"] / math.log(2) / 64, rel=1e-6)
    assert m1["bits_per_pixel"] > 0 and m1["steps"] == 6
    assert m1["latent_shape"] == [2, 4, 4] and m1["lineage"]["stage"] == "ul_stage1"
    assert (tmp_path / "models/ul_stage1/recon.png").is_file()
    assert (tmp_path / "metrics/ul_stage1_loss.tsv").read_text().startswith("step\tloss\tlr\tbits_per_pixel")
    m2 = ul_stage2.run(cfg, tmp_path)
    assert np.isfinite(m2["val_loss"]) and (tmp_path / "models/ul_stage2/samples.png").is_file()
    assert set(m2["lineage"]["inputs"]) == {"models/ul_stage1", "data/prepared"}
    a = sample_ul(tmp_path / "models/ul_stage1", tmp_path / "models/ul_stage2", 3, seed=1, device="cpu")
    assert a.shape == (3, *IMAGE) and torch.equal(a, sample_ul(tmp_path / "models/ul_stage1",
                                                                tmp_path / "models/ul_stage2", 3, seed=1, device="cpu"))
    args = argparse.Namespace(model="ul", n=3, out=str(tmp_path / "s.npy"), seed=1, root=str(tmp_path))
    assert main_sample(args) == 0
    arr = np.load(tmp_path / "s.npy")
    assert arr.shape == (3, *IMAGE) and arr.dtype == np.uint8
    assert main_sample(argparse.Namespace(**{**vars(args), "out": str(tmp_path / "s.jpg")})) == 2
    assert main_sample(argparse.Namespace(**{**vars(args), "root": str(tmp_path / "nowhere")})) == 1
