"""Gradient accumulation (train.micro_batch) and memory-mapped training data in the Trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrep.io import load_torch
from diffrep.train import Trainer
from diffrep.train.batches import ImageRows, check_data
from test_engine import CPU, Killed, TinyMLP, assert_same_weights, cfg, make_data, run


def one_update(tmp, micro: int, batch_size: int = 8):
    """Loss, terms, grad norm and the accumulated gradients of the first update."""
    torch.manual_seed(0)
    tr = Trainer(TinyMLP(), cfg(micro_batch=micro, batch_size=batch_size, grad_clip=0.5), CPU, make_data(), seed=3,
                 ckpt_dir=tmp / f"c{micro}", fingerprint="f", progress=False)
    grads, norm = [], tr._grad_norm

    def spy():  # the accumulated gradients, before clipping
        grads.extend(p.grad.clone() for p in tr.params)
        return norm()

    tr._grad_norm = spy
    stats, _, _ = tr.train_step(0)
    return stats, grads, tr


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(tmp_path, micro):
    whole, g_whole, _ = one_update(tmp_path, 0)
    split, g_split, tr = one_update(tmp_path, micro)
    assert tr.micro == micro and tr.local_batch == 8
    assert split == pytest.approx(whole, rel=1e-6, abs=1e-7)  # [loss, mse, noise_mean, grad_norm]
    for a, b in zip(g_whole, g_split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert one_update(tmp_path, 8)[0] == whole  # micro_batch >= the batch: no split, bit-identical


def test_micro_batch_training_matches_and_resumes_bit_identically(tmp_path):
    c = cfg(micro_batch=2, ckpt_every=5)
    full = run(tmp_path / "full", c, dropout=0.0)
    big = run(tmp_path / "big", cfg(ckpt_every=5), dropout=0.0)
    assert_same_weights(big.model, full.model, exact=False, atol=1e-5)  # 20 updates: float-rounding only
    with pytest.raises(Killed):
        run(tmp_path / "kill", c, dropout=0.0, killed_at=12)
    assert load_torch(tmp_path / "kill" / "ckpt" / "last.pt")["step"] == 10
    resumed = run(tmp_path / "kill", c, dropout=0.0)
    assert resumed.resumed_from_step == 10
    assert_same_weights(full.model, resumed.model)  # exact
    assert_same_weights(full.ema, resumed.ema)


def test_micro_batch_that_does_not_divide_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train.micro_batch=3 does not divide the per-process batch 8"):
        run(tmp_path, cfg(micro_batch=3))


def test_memory_mapped_columns_train_exactly_like_tensors(tmp_path):
    g = np.random.default_rng(0)
    imgs = g.integers(0, 256, (30, 1, 2, 2), dtype=np.uint8)  # (N, C, H, W)
    y = g.standard_normal((30, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", imgs), np.save(tmp_path / "y.npy", y)
    mapped = {"x": ImageRows(np.load(tmp_path / "x.npy", mmap_mode="r")), "y": np.load(tmp_path / "y.npy", mmap_mode="r")}
    assert isinstance(mapped["y"], np.memmap) and isinstance(mapped["x"].array, np.memmap)
    dense = {"x": torch.from_numpy(imgs).float().mul_(2.0 / 255.0).sub_(1.0), "y": torch.from_numpy(y)}
    torch.testing.assert_close(mapped["x"][torch.tensor([3, 0, 7])], dense["x"][[3, 0, 7]], rtol=0, atol=0)

    class Flat(TinyMLP):  # the (B, 1, 2, 2) images as (B, 4) vectors
        def forward(self, batch, rng):
            return super().forward({"x": batch["x"].flatten(1), "y": batch["y"]}, rng)

    res = []
    for data in (dense, mapped):
        torch.manual_seed(0)
        res.append(Trainer(Flat(), cfg(steps=8), CPU, data, seed=3, ckpt_dir=tmp_path / f"c{len(res)}",
                           fingerprint="f", progress=False).fit())
    assert_same_weights(res[0].model, res[1].model)  # exact: same rows, same float conversion


def test_bad_data_columns_are_refused_by_name():
    with pytest.raises(ValueError, match="numpy arrays"):
        check_data({"x": [1, 2, 3]}, 2)
    with pytest.raises(ValueError, match="disagree"):
        check_data({"x": np.zeros((4, 2)), "y": torch.zeros(5)}, 2)
    with pytest.raises(ValueError, match="uint8"):
        ImageRows(np.zeros((4, 1, 2, 2), dtype=np.float32))


def test_patch_pca_reads_only_the_drawn_images_and_fits_exactly_as_before():
    from diffrep.models.pca import PatchPCA
    from diffrep.nn.vit import patchify

    u8 = np.random.default_rng(1).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)  # 4 patches of 4x4 each
    rows = ImageRows(u8)
    x = rows[:]
    # the previous fit: every patch of every image in memory, then a random subset
    g = torch.Generator().manual_seed(5)
    old = patchify(x, 4).reshape(-1, 16)[torch.randperm(160, generator=g)[:50]].double()
    read = []

    class Spy(ImageRows):
        def __getitem__(self, idx):
            read.append(len(idx) if not isinstance(idx, slice) else len(self))
            return super().__getitem__(idx)

    for images in (x, Spy(u8)):
        pca = PatchPCA(1, 4).fit_(images, 50, generator=torch.Generator().manual_seed(5))
        mean = old.mean(0)
        torch.testing.assert_close(pca.mean, mean.float(), rtol=0, atol=0)
    assert read and read[0] < 40  # only the images holding one of the 50 drawn patches were read


def test_image_rows_read_from_the_file_equal_the_array(tmp_path):
    u8 = np.random.default_rng(2).integers(0, 256, (9, 3, 2, 2), dtype=np.uint8)
    np.save(tmp_path / "x.npy", u8)
    rows, plain = ImageRows(np.load(tmp_path / "x.npy", mmap_mode="r")), ImageRows(u8)
    assert rows._file is not None and plain._file is None  # the mapped one reads with pread
    for idx in (slice(None), slice(2, 7), slice(1, 9, 3), slice(5, 2), torch.tensor([8, 0, 0, -1]), np.array([4])):
        torch.testing.assert_close(rows[idx], plain[idx], rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of range"):
        rows[torch.tensor([9])]
    with open(tmp_path / "x.npy", "r+b") as f:  # truncated behind the loader's back
        f.truncate(f.seek(0, 2) - 12)
    with pytest.raises(OSError, match="short read"):
        rows[torch.tensor([8])]
