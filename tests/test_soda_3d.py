"""SODA's 3D claims, the pieces: multi-view codes, sub-vector swaps (edits), DCI on known codes, the edit command."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffrep.cli import main as cli
from diffrep.config import SodaConfig, to_dict
from diffrep.eval import nvs
from diffrep.eval.control import swap_group
from diffrep.eval.dci import dci, dci_intervals
from diffrep.eval.grid import tile
from diffrep.models.artifact import save_model
from diffrep.models.soda import Soda
from diffrep.nn.unet import ResBlock
from helpers import perturb

NET = {"channels": 8, "channel_mult": [1, 2, 2], "attn_resolutions": [], "groups": 4, "heads": 1}


def tiny_soda(pose_dim: int = 3, channels: int = 3, std: float = 0.1) -> Soda:
    cfg = SodaConfig.model_validate({"z_dim": 9, "encoder": {"width": 8, "stages": 2}, "unet": NET,
                                     "diffusion": {"sample_steps": 3}})
    return perturb(Soda(cfg, (channels, 8, 8), pose_dim=pose_dim), std=std).eval()


def test_multi_view_average_of_identical_views_is_the_single_view():
    model = tiny_soda(std=0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    assert torch.equal(nvs.multi_view_z(model, x[:, None].expand(-1, 3, -1, -1, -1)), model.encode(x))  # exactly
    views = torch.stack([x, x, x, torch.rand(4, 3, 8, 8, generator=g)], 1)  # three identical sources, a target
    poses = torch.rand(4, 4, 3, generator=g)
    out = nvs.synthesise(model, views, poses, (1, 3), seed=0)
    assert torch.equal(out[1], out[3])  # (a plain mean was 1 ulp off in z for some inits: 7e-5 in the render)
    with pytest.raises(ValueError, match="k=4 source views need objects with more than 4 views"):
        nvs.synthesise(model, views, poses, (4,), seed=0)


def test_pose_bin_means_average_each_bin():
    az = torch.tensor([-0.6, -0.5, 0.6])  # two views from the left, one from the right (of +-70 degrees)
    poses = torch.stack([az.sin(), az.cos(), torch.tensor([0.2, 0.3, 0.6])], 1)
    x = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2)
    assert nvs.pose_bins(poses, 2, 1).tolist() == [0, 0, 1]
    means = nvs.pose_bin_means(x, poses, (2, 1))
    assert torch.equal(means[0], torch.full((1, 2, 2), 0.5)) and torch.equal(means[1], x[2])
    assert torch.equal(nvs.pose_bin_means(x, poses, (3, 1))[1], x.mean(0))  # an empty bin: the overall mean


def test_swap_with_itself_changes_nothing_and_bad_group_is_named():
    model = tiny_soda()
    z = torch.randn(2, 9)
    sizes = model.decoder.z_sizes
    for g in range(len(sizes)):
        assert torch.equal(swap_group(z, z, sizes, g), z)
    pose, noise = torch.rand(2, 3), torch.randn(2, 3, 8, 8)
    assert torch.equal(model.decode(z, pose, noise=noise), model.decode(swap_group(z, z, sizes, 1), pose, noise=noise))
    with pytest.raises(ValueError, match=r"group 3 does not exist; this model's z has groups 0..2"):
        swap_group(z, z, sizes, 3)


@pytest.mark.parametrize("group", [0, 1, 2])
def test_swap_changes_only_the_swapped_groups_modulation(group):
    """Hooks on every residual block's z modulation: only the blocks of the swapped level see a new z."""
    model = tiny_soda()
    seen: dict[str, list[torch.Tensor]] = {}
    blocks = {n: m for n, m in model.decoder.named_modules() if isinstance(m, ResBlock)}
    for name, block in blocks.items():
        block.z_mod.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(out))
    z_a, z_b = torch.randn(1, 9), torch.randn(1, 9)
    x, lam = torch.randn(1, 3, 8, 8), torch.zeros(1)
    model.decoder(x, lam, z=z_a)
    model.decoder(x, lam, z=swap_group(z_a, z_b, model.decoder.z_sizes, group))
    for name, block in blocks.items():
        changed = not torch.equal(*seen[name])
        assert changed == (block.level == group), name


def test_dci_of_a_permutation_is_one_and_of_a_rotation_is_about_zero():
    """Codes = the factors permuted: D = C = 1. Codes = the factors under the Hadamard rotation (every code dim an
    equal mix of every factor): D ~ 0. A random rotation mixes less evenly: low, not zero."""
    rng = np.random.default_rng(0)
    f = rng.random((900, 4))
    perm = f[:, [2, 0, 3, 1]]
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
    rot, rand = (f - 0.5) @ hadamard, (f - 0.5) @ np.linalg.qr(rng.normal(size=(4, 4)))[0]
    codes = {n: (c[:600], c[600:]) for n, c in (("perm", perm), ("rot", rot), ("rand", rand))}
    out = dci_intervals(codes, f[:600], f[600:], np.arange(300) // 3, bins=4, n_estimators=5, resamples=100,
                        against="perm")
    assert out["codes"]["perm"]["disentanglement"] > 0.97 and out["codes"]["perm"]["completeness"] > 0.97
    assert out["codes"]["rot"]["disentanglement"] < 0.05 and out["codes"]["rand"]["disentanglement"] < 0.4
    lo, hi = out["codes"]["rand"]["disentanglement_ci95"]
    assert lo <= out["codes"]["rand"]["disentanglement"] <= hi
    row = next(r for r in out["paired"] if r["metric"] == "disentanglement" and r["b"] == "rot")
    assert row["diff_ci95"][0] > 0.9 and row["p_value"] < 0.05
    kw = {"bins": 4, "n_estimators": 5}
    assert dci(perm[:600], f[:600], perm[600:], f[600:], **kw)["disentanglement"] > 0.97  # the impurity one too
    assert dci(rot[:600], f[:600], rot[600:], f[600:], **kw)["disentanglement"] < 0.05


# ---------------------------------------------------------------- the edit command
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    for name, source, pose_dim, ch in (("shapes", "shapes", 3, 3), ("mnist", "mnist5k", 0, 1)):
        m = tiny_soda(pose_dim, ch)
        save_model(root / name, m, kind="soda", section=to_dict(m.cfg), image_shape=m.image_shape,
                   extra={"pose_dim": pose_dim}, full_config={"data": {"source": source}})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "b.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "big.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "gray.png")
    return root


def test_edit_and_interpolate_write_their_grids(artifacts):
    r = artifacts
    assert cli(["edit", "soda", "--a", f"{r}/a.png", "--b", f"{r}/b.png", "--group", "1", "--model", f"{r}/shapes",
                "--out", f"{r}/grid.png"]) == 0
    h, w = tile(torch.zeros(6, 3, 8, 8), 3, upscale=3).shape[:2]
    assert Image.open(r / "grid.png").size == (w, h)  # rows a, b; columns: image, decoded, edited
    assert cli(["interpolate", "soda", "--a", f"{r}/a.png", "--b", f"{r}/b.png", "--n", "4", "--model",
                f"{r}/shapes", "--out", f"{r}/strip.png"]) == 0


@pytest.mark.parametrize("change, message", [
    ({"--group": "3"}, "--group 3: unknown; this SODA's z has groups 0..2"),
    ({"--a": "big.png"}, "16x16 pixels; the model takes 8x8"),
    ({"--b": "gray.png"}, "1 channel(s) (mode L); the model takes 3"),
    ({"--model": "mnist"}, "a SODA from another pipeline (data.source: mnist5k"),
    ({"--model": "nowhere"}, "no SODA artifact there"),
])
def test_edit_refuses_bad_inputs_by_name(artifacts, capsys, change, message):
    r = artifacts
    args = {"--a": "a.png", "--b": "b.png", "--group": "0", "--model": "shapes", "--out": "bad.png"} | change
    argv = ["edit", "soda"] + [x for k, v in args.items() for x in (k, v if k == "--group" else f"{r}/{v}")]
    assert cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not (r / "bad.png").exists()


def test_global_modulation_is_one_group_that_drives_every_level():
    cfg = SodaConfig.model_validate({"z_dim": 9, "modulation": "global", "encoder": {"width": 8, "stages": 2},
                                     "unet": NET})
    model = perturb(Soda(cfg, (3, 8, 8), pose_dim=3), std=0.1).eval()
    assert model.n_groups == 1 and model.decoder.z_sizes == [9]
    assert all(b.z_mod.in_features == 9 for b in model.decoder.modules() if isinstance(b, ResBlock))
    x, lam, z = torch.randn(2, 3, 8, 8), torch.zeros(2), torch.randn(2, 9)
    off = model.decoder(x, lam, z=z, z_keep=torch.zeros(2, 1, dtype=torch.bool))
    assert torch.equal(off, model.decoder(x, lam))  # the one group dropped = no z at all


def test_views_same_on_3d_data_is_one_view_at_its_own_pose():
    from diffrep.train.rng import BatchRNG

    model = tiny_soda()
    model.cfg = model.cfg.model_copy(update={"views": "same"})
    images, poses = torch.randn(5, 4, 3, 8, 8), torch.randn(5, 4, 3)
    src, tgt, pose = model.views({"images": images, "poses": poses}, BatchRNG(0, 0, 5))
    assert torch.equal(src, tgt)
    hit = [(images[i] == src[i]).flatten(1).all(1).nonzero().item() for i in range(5)]
    assert torch.equal(pose, poses[torch.arange(5), hit])
