"""SODA: views, the model's loss, its inference methods, and its artifact."""
from __future__ import annotations

import pytest
import torch

from helpers import perturb

from diffrep.config import EncoderConfig, SodaConfig, TrainConfig, UNetConfig, ViewsConfig
from diffrep.data.views import augment, pick_two_views
from diffrep.io import ArtifactError
from diffrep.models.artifact import load_model, save_model
from diffrep.models.soda import Soda
from diffrep.data.prepared import group_views
from diffrep.train.rng import BatchRNG

TINY = SodaConfig(
    z_dim=12, encoder=EncoderConfig(width=8, depth=1, stages=2),
    unet=UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=(4,), groups=4, heads=1),
    train=TrainConfig(steps=10, batch_size=8),
)


def test_augment_is_deterministic_per_step_and_differs_per_image():
    x = torch.linspace(-1, 1, 8 * 64).reshape(8, 1, 8, 8)
    policy = ViewsConfig(crop_scale=(0.3, 0.6), brightness=0.5, contrast=0.5)
    a = augment(x, policy, BatchRNG(0, 3, 8))
    b = augment(x, policy, BatchRNG(0, 3, 8))
    c = augment(x, policy, BatchRNG(0, 4, 8))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, x)


def test_full_crop_without_jitter_is_identity():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    policy = ViewsConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, brightness=0, contrast=0)
    assert torch.allclose(augment(x, policy, BatchRNG(0, 0, 4)), x, atol=1e-5)


def test_flip_mirrors_when_drawn():
    x = torch.rand(64, 1, 4, 4)
    policy = ViewsConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True, brightness=0, contrast=0)
    y = augment(x, policy, BatchRNG(0, 0, 64))
    flipped = torch.isclose(y, x.flip(-1), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(y, x, atol=1e-5).flatten(1).all(1)
    assert (flipped | same).all() and 10 < flipped.sum() < 54


def test_two_views_are_different_cameras_of_one_object():
    B, V = 32, 4
    images = torch.arange(B * V, dtype=torch.float).reshape(B, V, 1, 1, 1).expand(B, V, 1, 2, 2)
    poses = torch.arange(B * V, dtype=torch.float).reshape(B, V, 1)
    src, tgt, pose = pick_two_views(images, poses, BatchRNG(0, 0, B))
    s, t = src[:, 0, 0, 0].long(), tgt[:, 0, 0, 0].long()
    assert (s // V == torch.arange(B)).all() and (t // V == torch.arange(B)).all()
    assert (s != t).all() and torch.equal(pose[:, 0].long(), t)


def test_group_views_orders_by_object_and_rejects_ragged():
    ids = torch.tensor([2, 0, 1, 0, 2, 1])
    imgs = ids.float().reshape(6, 1, 1, 1)
    g, p = group_views(imgs, ids.float()[:, None], ids)
    assert g.shape == (3, 2, 1, 1, 1) and torch.equal(g[:, 0, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="views"):
        group_views(imgs[:5], ids.float()[:5, None], ids[:5])


def _overfit(model: Soda, batch: dict, steps: int = 60) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        # same noise and views every step: the loss of one fixed problem must fall
        loss, _ = model(batch, BatchRNG(0, 0, len(batch["images"])))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_soda_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = Soda(TINY, (1, 8, 8))
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    first, last = _overfit(model, {"images": x})
    assert last < 0.5 * first


def test_soda_with_poses_trains_and_synthesises_views():
    torch.manual_seed(0)
    model = Soda(TINY, (3, 8, 8), pose_dim=3)
    batch = {"images": torch.rand(4, 3, 3, 8, 8) * 2 - 1, "poses": torch.randn(4, 3, 3)}
    first, last = _overfit(model, batch, steps=40)
    assert last < first
    nv = model.novel_view(batch["images"][:, 0], batch["poses"][:, 1], steps=3)
    assert nv.shape == (4, 3, 8, 8) and nv.abs().max() <= 1


def test_encode_decode_interpolate_shapes_and_determinism():
    torch.manual_seed(0)
    model = Soda(TINY, (1, 8, 8)).eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert model.encode(x).shape == (3, 12)
    r1 = model.reconstruct(x, steps=4, generator=torch.Generator().manual_seed(1))
    r2 = model.reconstruct(x, steps=4, generator=torch.Generator().manual_seed(1))
    assert r1.shape == x.shape and torch.equal(r1, r2)
    model = perturb(model, std=0.1)  # off the zero init, so the decoder depends on z
    path = model.interpolate(x[0], x[1], n=5, steps=3, seed=2)
    assert path.shape == (5, 1, 8, 8)
    # the ends and the middle decode the two codes and their mean, all from the same noise
    za, zb = model.encode(x[:1]), model.encode(x[1:2])
    noise = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    for i, z in ((0, za), (2, (za + zb) / 2), (4, zb)):
        torch.testing.assert_close(path[i:i + 1], model.decode(z, noise=noise, steps=3), atol=1e-5, rtol=0)
    assert not torch.allclose(path[0], path[4], atol=1e-3)


def test_artifact_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = Soda(TINY, (1, 8, 8))
    for p in model.parameters():  # move off the zero init so a wrong load would show
        p.data.normal_()
    save_model(tmp_path / "m", model, kind="soda", section=TINY.model_dump(mode="json"), image_shape=(1, 8, 8))
    loaded = load_model(tmp_path / "m", "soda")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded.encode(x), model.eval().encode(x))
    with pytest.raises(ArtifactError, match="expected 'ldae'"):
        load_model(tmp_path / "m", "ldae")
    (tmp_path / "m" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="model.pt"):
        load_model(tmp_path / "m", "soda")
