"""l-DAE: patch-PCA tokenizer, latent noise, loss weights, the DiT-style ViT, and a tiny overfit."""
from __future__ import annotations

import pytest
import torch

from diffrep.config import LdaeConfig, ViewsConfig
from diffrep.data.views import augment
from diffrep.models.ldae import Ldae
from diffrep.models.pca import PatchPCA
from diffrep.nn import set_attention_backend
from diffrep.nn.vit import ViT, patchify, unpatchify
from diffrep.train.rng import BatchRNG

SHAPE = (1, 8, 8)


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth, correlated test images in [-1, 1] (so PCA has a real spectrum)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, SHAPE[0], 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=SHAPE[1:], mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1) * 2 - 1


def model(**kw) -> Ldae:
    vit = dict(patch_size=4, dim=32, depth=2, heads=2)
    vit.update(kw.pop("vit", {}))
    cfg = LdaeConfig.model_validate(dict(pca_dim=4, pca_fit_patches=100, vit=vit, **kw))
    torch.manual_seed(0)
    m = Ldae(cfg, SHAPE)
    m.fit_tokenizer(images())
    return m


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    t = patchify(x, 4)  # (2, 6, 48)
    assert t.shape == (2, 6, 48)
    assert torch.equal(t[1, 1], x[1, :, 0:4, 4:8].reshape(-1))  # token 1 = row 0, column 1, channel-major
    assert torch.equal(unpatchify(t, 4, (3, 8, 12)), x)
    with pytest.raises(ValueError, match="patch size"):
        patchify(torch.randn(1, 1, 10, 10), 4)


def test_pca_full_rank_roundtrip_and_standardised():
    x = images(200)
    pca = PatchPCA(1, 4).fit_(x, n_patches=10**9)  # every grid patch
    z = pca.encode(x)  # (200, 4, 16)
    torch.testing.assert_close(pca.decode(z, SHAPE), x, atol=1e-5, rtol=0)
    flat = z.reshape(-1, 16).double()
    torch.testing.assert_close(flat.mean(0), torch.zeros(16, dtype=torch.double), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(16, dtype=torch.double), atol=1e-4, rtol=0)  # unit variance
    assert (pca.std[:-1] >= pca.std[1:]).all()  # sorted by variance
    torch.testing.assert_close(pca.basis @ pca.basis.T, torch.eye(16), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchPCA(1, 4).encode(x)


def test_pca_survives_state_dict():
    a = model()
    b = Ldae(a.cfg, SHAPE)
    b.load_state_dict(a.state_dict())
    x = images(4, seed=1)
    assert bool(b.tokenizer.fitted)
    torch.testing.assert_close(b.features(x), a.features(x))


def coords_of_noise(m: Ldae, x: torch.Tensor, sigma: float) -> torch.Tensor:
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    s = torch.full((len(x),), sigma)
    diff = m.noisy_input(x, s, eps) - m.noisy_input(x, torch.zeros_like(s), eps)
    return m.tokenizer.coords(diff, centre=False)  # (B, N, D)


def test_noise_confined_to_top_d_in_latent_mode():
    m, x = model(noise_space="latent"), images(8, seed=2)
    c = coords_of_noise(m, x, 1.0)
    assert c[..., 4:].abs().max() < 1e-5  # nothing beyond d
    assert c[..., :4].abs().mean() > 0.1
    # in standardised units the noise is exactly sigma * eps
    z = c[..., :4] / m.tokenizer.std[:4]
    eps = patchify(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)), 4)[..., :4]
    torch.testing.assert_close(z, eps, atol=1e-4, rtol=1e-4)
    # the clean input is the top-d projection: its coordinates beyond d are 0
    clean_in = m.noisy_input(x, torch.zeros(8), torch.zeros_like(x))
    assert m.tokenizer.encode(clean_in)[..., 4:].abs().max() < 1e-4


def test_unstandardised_latent_noise_is_sigma_eps_in_orthonormal_coords():
    m, x = model(noise_space="latent", standardize=False), images(8, seed=2)
    torch.testing.assert_close(m.tokenizer.std, torch.ones(16))
    torch.testing.assert_close(m.tokenizer.encode(x), m.tokenizer.coords(x))  # the natural scale
    c = coords_of_noise(m, x, 0.5)
    eps = patchify(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)), 4)[..., :4]
    torch.testing.assert_close(c[..., :4], 0.5 * eps, atol=1e-4, rtol=1e-4)  # same sigma for every component
    assert c[..., 4:].abs().max() < 1e-5
    z = m.tokenizer.encode(x)
    torch.testing.assert_close(m.tokenizer.decode(z, SHAPE), x, atol=1e-5, rtol=0)  # still exact at full rank


def test_noise_everywhere_in_pixel_mode():
    m, x = model(noise_space="pixel"), images(8, seed=2)
    c = coords_of_noise(m, x, 1.0)
    assert c[..., 4:].abs().mean() > 0.1
    torch.testing.assert_close(m.noisy_input(x, torch.zeros(8), torch.randn_like(x)), x)


@pytest.mark.parametrize("k", [0, 3, 4, 15])
def test_loss_weights_exact(k):
    m, x = model(rest_weight=0.1), images(2, seed=4)
    # a residual that is one unit of component k in token 1 of every image
    c = torch.zeros(2, 4, 16)
    c[:, 1, k] = 1.0
    pred = x + unpatchify(c @ m.tokenizer.basis, 4, SHAPE)
    sigma = torch.tensor([0.0, 1.0])
    w = 1.0 if k < 4 else 0.1
    expected = w / (4 * 16) / (1 + sigma**2)  # mean over N*D entries, times 1/(1+sigma^2)
    torch.testing.assert_close(m.residual_loss(pred, x, sigma), expected, atol=1e-6, rtol=1e-5)


def test_rest_weight_one_is_pixel_mse():
    m, x = model(rest_weight=1.0), images(3, seed=5)
    pred = torch.randn_like(x)
    torch.testing.assert_close(m.residual_loss(pred, x, torch.zeros(3)), (pred - x).square().mean((1, 2, 3)))


def test_vit_shapes_and_adaln_zero_identity():
    vit = ViT(3, 8, patch_size=2, dim=32, depth=4, heads=4)
    x, logsnr = torch.randn(5, 3, 8, 8), torch.randn(5)
    assert vit(x, logsnr).shape == (5, 3, 8, 8)
    assert vit.encode(x, logsnr).shape == (5, 16, 32)
    assert vit.n_encoder == 2
    assert vit(x, logsnr).abs().max() == 0  # final layer zero at init
    h = torch.randn(5, 16, 32)
    c = torch.randn(5, 32)
    for blk in vit.blocks:  # every block is the identity at init
        assert torch.equal(blk(h, c), h)
    with pytest.raises(ValueError, match="expects"):
        vit(torch.randn(1, 1, 8, 8), 0.0)


def test_attention_backends_agree_through_vit():
    torch.manual_seed(0)
    vit = ViT(1, 8, patch_size=2, dim=32, depth=2, heads=4)
    for p in vit.parameters():  # leave init so attention actually matters
        torch.nn.init.normal_(p, std=0.1)
    x, logsnr = torch.randn(3, 1, 8, 8), torch.randn(3)
    outs = {}
    for b in ("math", "sdpa"):
        assert set_attention_backend(vit, b) == 2
        outs[b] = vit(x, logsnr)
    assert outs["math"].abs().mean() > 1e-3
    torch.testing.assert_close(outs["math"], outs["sdpa"], atol=1e-5, rtol=1e-4)


def test_features_shape_and_determinism():
    m, x = model(feature_pool="mean"), images(6, seed=6)
    f = m.features(x)
    assert f.shape == (6, 32)
    assert torch.equal(f, m.features(x))
    tokens = m.encoder_tokens(x)  # (6, 4, 32): four 4x4 patches of an 8x8 image
    torch.testing.assert_close(f, tokens.mean(1))


def test_flatten_pool_keeps_the_token_layout():
    m, x = model(feature_pool="flatten"), images(6, seed=6)
    tokens = m.encoder_tokens(x)
    f = m.features(x)
    assert f.shape == (6, 4 * 32)
    assert torch.equal(f.reshape(6, 4, 32), tokens)  # token-major: feature block i is token i


def test_augment_crops_the_training_image_with_the_step_rng():
    policy = dict(crop_scale=(0.5, 0.7), brightness=0.2, contrast=0.2)
    x = images(6, seed=8)
    seen = []
    for aug in (None, policy, policy):
        m = model(noise_space="pixel", sigma_max=1e-7, augment=aug)  # ~no noise: the net sees the (augmented) image
        m.net.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
        loss, _ = m({"images": x}, BatchRNG(0, 5, 6))
        assert torch.isfinite(loss)
    torch.testing.assert_close(seen[0], x)  # augment null: the image as it is (the default)
    assert torch.equal(seen[1], seen[2])  # same step -> same crops
    expected = augment(x, ViewsConfig.model_validate(policy), BatchRNG(0, 5, 6))
    torch.testing.assert_close(seen[1], expected)  # the shared tensor-side views code, drawn from the step's rng
    assert (seen[1] - x).abs().mean() > 0.05


def test_bad_pca_dim():
    with pytest.raises(ValueError, match="pca_dim"):
        Ldae(LdaeConfig.model_validate(dict(pca_dim=17, vit=dict(patch_size=4, dim=32, depth=2, heads=2))), SHAPE)


def test_loss_falls_when_overfitting_tiny_batch():
    m = model(vit=dict(dim=32, depth=2))
    x = images(8, seed=7)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss, terms = m({"images": x}, BatchRNG(0, step % 4, 8))  # 4 fixed noise draws
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert torch.isfinite(terms["mse"])
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_stage_end_to_end_and_artifact_round_trip(prepared_digits, tmp_path, monkeypatch):
    import json
    import shutil

    from diffrep.config import parse_config
    from diffrep.data.prepared import load_prepared
    from diffrep.models import artifact
    from diffrep.stages.ldae import run

    root, _ = prepared_digits
    shutil.copytree(root / "data", tmp_path / "data")
    cfg = parse_config({"seed": 0, "data": {"source": "digits", "image_size": 8}, "runtime": {"device": "cpu"},
                        "ldae": {"pca_dim": 4, "pca_fit_patches": 1000, "vit": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2},
                                 "train": {"steps": 12, "batch_size": 32, "ckpt_every": 6, "log_every": 4}}}, "test")
    metrics = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "metrics/ldae.json").read_text())
    for key in ("final_loss", "images_per_s", "steps", "feature_pool", "wall_s", "lineage"):
        assert key in on_disk, key
    assert on_disk["steps"] == 12 and metrics["feature_pool"] == "flatten"  # probes are the linear_probe stage's
    assert (tmp_path / "models/ldae/grid.png").is_file()
    assert (tmp_path / "metrics/ldae_loss.tsv").is_file()
    loaded = artifact.load_model(tmp_path / "models/ldae", "ldae")
    assert bool(loaded.tokenizer.fitted)
    x = load_prepared(tmp_path / "data/prepared").images_float("val")[:5]
    assert loaded.features(x).shape == (5, 4 * 32) and torch.isfinite(loaded.features(x)).all()

    # the same data, params and code give the same bytes, so DVC would skip every stage downstream of a re-run
    from diffrep.io import path_hash

    again = tmp_path / "again"
    shutil.copytree(root / "data", again / "data")
    run(cfg, again)
    assert path_hash(again / "models/ldae") == path_hash(tmp_path / "models/ldae")
