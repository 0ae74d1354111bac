"""diffrep.nn: attention backends, embeddings, the AdaGN UNet (layer modulation), the encoder."""
import math

import pytest
import torch

from helpers import perturb

import diffrep.nn.attention as attn_mod
from diffrep.nn import (MultiHeadSelfAttention, ResNetEncoder, SelfAttention2d, UNet, logsnr_to_unit,
                        resolve_backend, set_attention_backend, sinusoidal, xformers_available)
from diffrep.nn.attention import attention
from diffrep.nn.layers import PreActBlock, zero_
from diffrep.nn.unet import ResBlock, split_sizes

TINY = dict(channels=8, groups=4, heads=2)


# ---------------------------------------------------------------- attention
def test_math_and_sdpa_agree_incl_noncontiguous():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 11, 8).unbind(0)  # (B, H, N, D)
    ref = attention(q, k, v, "math")
    assert torch.allclose(ref, attention(q, k, v, "sdpa"), atol=1e-5)
    # closed form: with identical keys every query averages the values
    assert torch.allclose(attention(q, torch.zeros_like(k), v, "math"), v.mean(2, keepdim=True).expand_as(v), atol=1e-6)
    # strided views (what the modules produce) and a different key length
    qt, kt, vt = (torch.randn(2, 7, 3, 8).transpose(1, 2) for _ in range(3))  # (B, H, N, D), non-contiguous
    kt, vt = kt[:, :, :5], vt[:, :, :5]
    assert not qt.is_contiguous()
    assert torch.allclose(attention(qt, kt, vt, "math"), attention(qt, kt, vt, "sdpa"), atol=1e-5)
    with pytest.raises(ValueError, match="expects q"):
        attention(q, k[..., :4], v, "math")


@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(),
                    reason="xformers backend needs CUDA and the `gpu` extra (pip install --no-deps xformers)")
def test_xformers_matches_sdpa_on_cuda():
    q, k, v = (torch.randn(2, 64, 4, 32, device="cuda").transpose(1, 2) for _ in range(3))  # (B, H, N, D) views
    assert torch.allclose(attention(q, k, v, "xformers"), attention(q, k, v, "sdpa"), atol=1e-3)
    m = SelfAttention2d(32, heads=4).cuda()
    perturb(m)
    x = torch.randn(2, 32, 8, 8, device="cuda")
    m.attn_backend = "xformers"
    a = m(x)
    m.attn_backend = "math"
    assert torch.allclose(a, m(x), atol=1e-3)


def test_resolve_backend_rule(monkeypatch):
    assert resolve_backend("sdpa", "cpu") == "sdpa" and resolve_backend("math", "cpu") == "math"
    for ok, expect in ((True, "xformers"), (False, "sdpa")):
        monkeypatch.setattr(attn_mod, "_xformers_ok", ok)
        assert resolve_backend("auto", torch.device("cuda")) == expect
        assert resolve_backend("auto", "cpu") == "sdpa"  # never xformers off CUDA
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("xformers", "cpu")
    monkeypatch.setattr(attn_mod, "_xformers_ok", False)
    with pytest.raises(RuntimeError, match="pip install --no-deps xformers"):
        resolve_backend("xformers", "cuda")
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("flash", "cpu")


def test_attention_modules_backends_agree_and_setter():
    torch.manual_seed(0)
    m2d, tok = perturb(SelfAttention2d(8, heads=2, groups=4)), perturb(MultiHeadSelfAttention(12, heads=3))
    x2d, xt = torch.randn(2, 8, 5, 3), torch.randn(2, 7, 12)
    outs = {}
    for name in ("math", "sdpa"):
        assert set_attention_backend(torch.nn.ModuleList([m2d, tok]), name) == 2
        outs[name] = m2d(x2d), tok(xt)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs["math"], outs["sdpa"]))
    assert outs["math"][1].shape == xt.shape
    assert torch.equal(SelfAttention2d(8, 2, 4)(x2d), x2d)  # zero-init proj: identity
    with pytest.raises(ValueError, match="unknown"):
        set_attention_backend(m2d, "fast")
    with pytest.raises(ValueError, match="heads=3 must divide"):
        MultiHeadSelfAttention(8, heads=3)


# ---------------------------------------------------------------- embeddings
def test_logsnr_to_unit_closed_form():
    lam = torch.tensor([-math.inf, -20.0, -3.0, 0.0, 3.0, 20.0, math.inf])
    u = logsnr_to_unit(lam)
    expected = [1.0] + [2 / math.pi * math.atan(math.exp(-v / 2)) for v in (-20.0, -3.0, 0.0, 3.0, 20.0)] + [0.0]
    torch.testing.assert_close(u, torch.tensor(expected))
    torch.testing.assert_close(u + logsnr_to_unit(-lam), torch.ones(7))  # atan(x) + atan(1/x) = pi/2
    # it is the time of the untruncated cosine schedule, logsnr = -2 log tan(pi u / 2)
    torch.testing.assert_close(-2 * torch.log(torch.tan(math.pi * u[1:-1] / 2)), lam[1:-1], rtol=1e-4, atol=1e-4)


def test_sinusoidal_features_closed_form():
    e = sinusoidal(torch.tensor([0.0, 2.0]), 7)  # odd dim: a zero column at the end
    freqs = [math.exp(-math.log(10_000.0) * i / 3) for i in range(3)]
    row = [math.cos(2 * f) for f in freqs] + [math.sin(2 * f) for f in freqs] + [0.0]
    torch.testing.assert_close(e, torch.tensor([[1.0] * 3 + [0.0] * 4, row]))


# ---------------------------------------------------------------- UNet
@pytest.mark.parametrize("size,mult,attn", [(8, (1,), (8,)), (16, (1, 2), (8,)), (28, (1, 2, 2), (7,)),
                                            (32, (1, 2, 2, 2), (4,)), (8, (1, 1, 2, 2), (1, 2))])
def test_unet_shapes_and_zero_at_init(size, mult, attn):
    G = len(mult)
    z_dim = 3 * G + 1
    m = UNet(3, 2, size, channel_mult=mult, attn_resolutions=attn, z_dim=z_dim, pose_dim=5, cond_channels=4, **TINY)
    assert len(m.z_sizes) == G and sum(m.z_sizes) == z_dim and m.z_sizes == split_sizes(z_dim, G)
    assert any(isinstance(x, SelfAttention2d) for x in m.modules())
    B = 2
    x = torch.randn(B, 3, size, size)
    kw = dict(z=torch.randn(B, z_dim), pose=torch.randn(B, 5), cond=torch.randn(B, 4, size // 4 or 1, size // 4 or 1))
    out = m(x, torch.randn(B), **kw)
    assert out.shape == (B, 2, size, size) and torch.equal(out, torch.zeros_like(out))  # zero-init conv_out
    out = perturb(m)(x, 1.5, **kw)  # scalar logsnr broadcasts
    assert out.shape == (B, 2, size, size) and out.abs().mean() > 0 and torch.isfinite(out).all()


def test_zero_init_and_the_preact_block():
    lin = zero_(torch.nn.Linear(3, 4))
    assert torch.equal(lin(torch.randn(2, 3)), torch.zeros(2, 4))
    blk = PreActBlock(8, groups=4)
    x = torch.randn(2, 8, 4, 4)
    assert not torch.equal(blk(x), x)
    zero_(blk.conv2)  # a zero residual branch: the identity
    assert torch.equal(blk(x), x)


def test_resblock_identity_at_init():
    blk = ResBlock(8, 8, temb_dim=16, z_dim=3, groups=4, level=0)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(blk(x, torch.randn(2, 16), torch.randn(2, 3)), x)


def test_unet_bad_inputs():
    with pytest.raises(ValueError, match="groups=3 must divide"):
        UNet(1, 1, 16, channels=8, groups=3)
    with pytest.raises(ValueError, match="divisible by 2"):
        UNet(1, 1, 28, channel_mult=(1, 2, 2, 2), **TINY)
    with pytest.raises(ValueError, match="smaller than the number of levels"):
        UNet(1, 1, 16, z_dim=2, **TINY)
    m = UNet(1, 1, 8, channel_mult=(1, 2), z_dim=4, cond_channels=2, **TINY)
    x, lam, c = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.randn(2, 2, 4, 4)
    for kw, msg in [(dict(z=torch.randn(2, 5), cond=c), "z must be"), (dict(cond=None), "cond must be"),
                    (dict(z=torch.randn(2, 4), z_keep=torch.ones(2, 3, dtype=torch.bool), cond=c), "z_keep must be"),
                    (dict(z_keep=torch.ones(2, 2, dtype=torch.bool), cond=c), "without z"),
                    (dict(pose=torch.randn(2, 3), cond=c), "pose_dim=0")]:
        with pytest.raises(ValueError, match=msg):
            m(x, lam, **kw)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 1, 16, 16), lam, cond=c)
    with pytest.raises(ValueError, match="z_dim=0"):
        UNet(1, 1, 8, channel_mult=(1, 2), **TINY)(x, lam, z=torch.randn(2, 4))


def test_z_keep_false_is_no_z_and_pose_drop_is_null():
    torch.manual_seed(0)
    m = perturb(UNet(1, 1, 8, channel_mult=(1, 2), attn_resolutions=(4,), z_dim=6, pose_dim=2, **TINY))
    x, lam, z, pose = torch.randn(3, 1, 8, 8), torch.randn(3), torch.randn(3, 6), torch.randn(3, 2)
    no_z = m(x, lam, pose=pose)
    off = torch.zeros(3, 2, dtype=torch.bool)
    assert torch.allclose(m(x, lam, z=z, z_keep=off, pose=pose), no_z, atol=1e-6)
    with_z = m(x, lam, z=z, pose=pose)
    assert (with_z - no_z).abs().max() > 1e-3  # z matters once weights left init
    assert torch.allclose(m(x, lam, z=z, z_keep=~off, pose=pose), with_z)
    # per-example masking: only the masked row changes
    keep = torch.tensor([[True, True], [True, False], [True, True]])
    part = m(x, lam, z=z, z_keep=keep, pose=pose)
    assert torch.allclose(part[[0, 2]], with_z[[0, 2]], atol=1e-6) and (part[1] - with_z[1]).abs().max() > 1e-4
    # a dropped pose is the learned null embedding, the same as no pose
    assert torch.allclose(m(x, lam, z=z, pose=pose, pose_keep=torch.zeros(3, dtype=torch.bool)), m(x, lam, z=z), atol=1e-6)


def _res_blocks(m):
    return {n: b for n, b in m.named_modules() if isinstance(b, ResBlock)}


def test_each_z_group_modulates_only_its_level():
    torch.manual_seed(0)
    mult, nrb = (1, 2, 2), 2
    m = perturb(UNet(1, 1, 16, channel_mult=mult, num_res_blocks=nrb, attn_resolutions=(4,), z_dim=7, **TINY))
    blocks = _res_blocks(m)
    # routing by construction: per level nrb down + (nrb + 1) up blocks; the middle pair uses the last group
    for lvl in range(3):
        names = [n for n, b in blocks.items() if b.level == lvl]
        assert sum(n.startswith("down") for n in names) == nrb and sum(n.startswith("up") for n in names) == nrb + 1
        assert sum(n.startswith("mid") for n in names) == (2 if lvl == 2 else 0)
    mods = {}
    hooks = [b.z_mod.register_forward_hook(lambda mod, inp, out, n=n: mods.__setitem__(n, out.detach()))
             for n, b in blocks.items()]
    x, lam, z = torch.randn(2, 1, 16, 16), torch.randn(2), torch.randn(2, 7)
    m(x, lam, z=z)
    base = dict(mods)
    bounds = [0, *torch.tensor(m.z_sizes).cumsum(0).tolist()]
    for i in range(3):
        z2 = z.clone()
        z2[:, bounds[i]:bounds[i + 1]] += 1.0
        m(x, lam, z=z2)
        changed = {n for n in blocks if not torch.equal(mods[n], base[n])}
        assert changed == {n for n, b in blocks.items() if b.level == i}, f"group {i}"
    for h in hooks:
        h.remove()
    # gradients: keep only group i -> only level-i z projections get gradient; every group reaches the output
    for i in range(3):
        m.zero_grad()
        keep = torch.zeros(2, 3, dtype=torch.bool)
        keep[:, i] = True
        m(x, lam, z=z, z_keep=keep).square().sum().backward()
        for b in blocks.values():
            g = b.z_mod.weight.grad
            assert (g.abs().sum() > 0) == (b.level == i)
    zr = z.clone().requires_grad_(True)
    m(x, lam, z=zr).square().sum().backward()
    assert all(zr.grad[:, bounds[i]:bounds[i + 1]].abs().sum() > 0 for i in range(3))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    m = perturb(UNet(2, 2, 16, attn_resolutions=(4, 8), z_dim=6, cond_channels=1, **TINY))
    x, lam, z, c = torch.randn(2, 2, 16, 16), torch.randn(2), torch.randn(2, 6), torch.randn(2, 1, 4, 4)
    ref = m(x, lam, z=z, cond=c)
    m = m.to(memory_format=torch.channels_last)
    out = m(x.to(memory_format=torch.channels_last), lam, z=z, cond=c.to(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4)
    out.sum().backward()  # backward through strided views works too


def test_from_config_builds_what_the_section_says():
    from diffrep.config import EncoderConfig, UNetConfig

    cfg = UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=(8,), groups=4, heads=1)
    torch.manual_seed(0)
    m = UNet.from_config(cfg, 1, 2, 16, z_dim=6)
    torch.manual_seed(0)
    ref = UNet(1, 2, 16, channels=8, channel_mult=(1, 2), attn_resolutions=(8,), groups=4, heads=1, z_dim=6)
    assert m.z_sizes == [3, 3] and m.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    enc = ResNetEncoder.from_config(EncoderConfig(width=8, depth=2, stages=2), 1, 8, out_dim=5, groups=4)
    assert enc.output_shape == (5,) and sum(isinstance(b, PreActBlock) for b in enc.modules()) == 4


# ---------------------------------------------------------------- encoder
@pytest.mark.parametrize("size,stages", [(8, 2), (16, 3), (28, 3), (32, 3)])
def test_encoder_shapes(size, stages):
    x = torch.randn(2, 3, size, size)
    vec = ResNetEncoder(3, size, width=8, stages=stages, out_dim=10, groups=4)
    grid = ResNetEncoder(3, size, width=8, stages=stages, output="grid", grid_channels=4, groups=4)
    s = size // 2 ** (stages - 1)
    assert vec.output_shape == (10,) and vec(x).shape == (2, 10)
    assert grid.output_shape == (4, s, s) and grid(x).shape == (2, 4, s, s)


def test_encoder_mean_head_pools_the_final_map():
    """head="mean": z = Linear(global average of the final map), blind to where in the map a feature is."""
    torch.manual_seed(0)
    enc = ResNetEncoder(1, 16, width=8, stages=3, out_dim=6, groups=4, head="mean")
    x = torch.randn(3, 1, 16, 16)
    h = enc.body(x)  # (B, 32, 4, 4)
    assert enc.head.in_features == 32
    torch.testing.assert_close(enc(x), enc.head(h.mean((2, 3))))
    flat = ResNetEncoder(1, 16, width=8, stages=3, out_dim=6, groups=4)
    assert flat.head.in_features == 32 * 16


def test_encoder_bad_inputs():
    with pytest.raises(ValueError, match="head must be"):
        ResNetEncoder(1, 16, output="grid", grid_channels=4, head="mean")
    with pytest.raises(ValueError, match="head must be"):
        ResNetEncoder(1, 16, head="max")
    with pytest.raises(ValueError, match="divisible by 2"):
        ResNetEncoder(1, 28, stages=4)
    with pytest.raises(ValueError, match="grid_channels"):
        ResNetEncoder(1, 16, output="grid")
    with pytest.raises(ValueError, match="groups=8 must divide"):
        ResNetEncoder(1, 16, width=4)
    with pytest.raises(ValueError, match="x must be"):
        ResNetEncoder(1, 16)(torch.randn(2, 3, 16, 16))
