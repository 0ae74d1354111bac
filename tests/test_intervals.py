"""Intervals, paired tests and distances against closed forms and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffrep.eval.intervals import accuracy_summary, bootstrap_mean, wilson
from diffrep.eval.paired import mcnemar_exact, paired_test, sign_flip_test, verdict


def test_wilson_matches_the_closed_form_and_stays_in_0_1():
    # k = 8 of n = 10: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z/(1 + z^2/10) sqrt(0.016 + z^2/400)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert wilson(8, 10) == pytest.approx((centre - half, centre + half))
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook value
    lo, hi = wilson(0, 50)
    assert lo == 0.0 and 0 < hi < 0.08
    lo, hi = wilson(50, 50)
    assert hi == 1.0 and 0.92 < lo < 1
    with pytest.raises(ValueError, match="k <= n"):
        wilson(11, 10)


def test_bootstrap_of_a_constant_has_zero_width_and_of_a_mix_covers_the_mean():
    assert bootstrap_mean(torch.ones(200), resamples=500, seed=0) == (1.0, 1.0)
    scores = torch.tensor([0.0, 1.0] * 500)
    lo, hi = bootstrap_mean(scores, resamples=2000, seed=0)
    se = 0.5 / math.sqrt(1000)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_accuracy_summary_uses_wilson_for_0_1_and_bootstrap_for_seed_averages():
    binary = accuracy_summary(torch.tensor([1, 1, 0, 1] * 25).bool(), resamples=200, seed=0)
    assert binary["interval"] == "wilson" and binary["acc"] == 0.75
    assert binary["ci95"] == pytest.approx(list(wilson(75, 100)))
    avg = accuracy_summary(torch.tensor([1.0, 2 / 3, 1 / 3, 0.0] * 25), resamples=200, seed=0)
    assert avg["interval"].startswith("bootstrap") and avg["acc"] == pytest.approx(0.5)
    assert avg["ci95"][0] < 0.5 < avg["ci95"][1]


def test_mcnemar_hand_computed_cases():
    # 6 images only a gets right, 1 only b: p = 2 * P(X <= 1 | n=7) = 2 * 8/128 = 0.125
    a = torch.tensor([1] * 6 + [0] + [1] * 10 + [0] * 3).bool()
    b = torch.tensor([0] * 6 + [1] + [1] * 10 + [0] * 3).bool()
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (6, 1) and r["p_value"] == pytest.approx(0.125)
    assert mcnemar_exact(a, a)["p_value"] == 1.0
    # 10 / 0: p = 2 / 2^10
    assert mcnemar_exact(torch.ones(10).bool(), torch.zeros(10).bool())["p_value"] == pytest.approx(2 / 1024)


def test_paired_test_is_mcnemar_for_0_1_and_a_sign_flip_test_for_averages():
    a = torch.tensor([1] * 30 + [0] * 70).float()
    b = torch.tensor([0] * 30 + [0] * 70).float()
    r = paired_test(a, b)
    assert r["test"] == "exact McNemar" and r["verdict"] == "beats" and r["p_value"] == pytest.approx(2 / 2**30)
    assert paired_test(b, a)["verdict"] == "loses"
    same = paired_test(a, a.clone())
    assert same["verdict"] == "ties" and same["p_value"] == 1.0
    # seed-averaged scores: 30 images a better by 1/3, none worse -> p ~ 1/(B+1)
    a3, b3 = a * (2 / 3), b
    r = paired_test(a3, b3, resamples=999, seed=1)
    assert r["test"].startswith("paired sign-flip") and r["p_value"] == pytest.approx(1 / 1000)
    # for 0/1 scores the sign-flip test approximates the exact McNemar p
    x = torch.tensor([1] * 9 + [0] * 4 + [1] * 20).float()
    y = torch.tensor([0] * 9 + [1] * 4 + [1] * 20).float()
    assert sign_flip_test(x, y, resamples=20000, seed=0) == pytest.approx(mcnemar_exact(x, y)["p_value"], abs=0.02)
    assert verdict(0.05, 0.2) == "ties" and verdict(-0.05, 0.01) == "loses"


def test_kid_equals_torchmetrics_and_fd_equals_torchmetrics_fid_on_the_same_features():
    from torchmetrics.image.kid import poly_mmd

    from diffrep.eval.distances import KidKernels, frechet, stats
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g) * 1.2 + 0.3
    assert KidKernels(a, b).kid() == pytest.approx(float(poly_mmd(a.double(), b.double())), rel=1e-9)
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    want = ((a.mean(0) - b.mean(0)).double() ** 2).sum().item() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert frechet(stats(a), stats(b)) == pytest.approx(want, rel=1e-6)
    # multiplicities: counting every row once is the plain estimate; a row twice is never paired with itself
    k = KidKernels(a, b)
    assert k.kid(torch.ones(300), torch.ones(300)) == pytest.approx(k.kid())


def test_distances_intervals_and_paired_ratio():
    from diffrep.eval.distances import distances

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 6, generator=g)
    near = [torch.randn(200, 6, generator=g) for _ in range(2)]
    far = [torch.randn(200, 6, generator=g) + 1.0]
    d = distances(ref, {"near": near, "far": far}, resamples=50, seed=0, pairs=[("far", "near")])
    assert len(d["near"]["fd_draws"]) == 2 and d["near"]["fd"] == pytest.approx(np.mean(d["near"]["fd_draws"]))
    for name in ("near", "far"):
        lo, hi = d[name]["fd_ci95"]
        assert lo <= d[name]["fd"] <= hi or name == "near"  # a near-zero FD's bootstrap sits above it (bias)
    assert d["far"]["fd"] == pytest.approx(6.0, rel=0.25)  # ||mu shift||^2 = 6 x 1^2
    fd_row = next(r for r in d["paired"] if r["metric"] == "fd")
    assert fd_row["p_value"] < 0.05 and fd_row["diff_ci95"][0] > 0 and fd_row["ratio"] > 5
    with pytest.raises(ValueError, match="same D"):
        distances(ref, {"bad": [torch.randn(10, 5)]}, resamples=20, seed=0)


def test_reconstruction_scores_are_means_of_per_image_scores_with_bootstrap_intervals():
    from diffrep.eval.recon import mean_with_ci, psnr, psnr_per_image, scores, ssim, ssim_per_image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    per = psnr_per_image(y, x)
    mse = ((y - x) / 2).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per, 10 * torch.log10(1 / mse))  # the closed form, image by image
    assert psnr(y, x) == pytest.approx(per.mean().item()) and ssim(y, x) == pytest.approx(ssim_per_image(y, x).mean().item())
    s = scores(y, x, "recon")
    lo, hi = s["recon_psnr_ci95"]
    assert lo < s["recon_psnr"] < hi and per.min() <= lo and hi <= per.max()
    assert s["recon_ssim_ci95"][0] < s["recon_ssim"] < s["recon_ssim_ci95"][1]
    same = scores(x, x, "recon")  # identical images: SSIM 1 everywhere, an interval of zero width
    assert same["recon_ssim"] == pytest.approx(1.0) and same["recon_ssim_ci95"] == pytest.approx([1.0, 1.0])
    assert mean_with_ci(torch.full((7,), 0.25), "bpp") == {"bpp": 0.25, "bpp_ci95": [0.25, 0.25]}
