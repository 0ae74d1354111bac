"""No stage holds a whole split: 3D SODA training, shapes_eval's views, pose means and reader, the pixel baselines.

Each streaming path is checked against the in-memory one it replaced (exact where the arithmetic is the same,
to a stated tolerance where only the summation order changed), and for the rows it reads.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrep.config import SodaConfig, TrainConfig
from diffrep.data.prepared import group_views, load_prepared
from diffrep.models.soda import Soda
from diffrep.stages import prepare
from diffrep.stages.soda import training_data
from diffrep.train import Trainer
from diffrep.train.batches import ImageRows, ObjectViews, check_data, view_index
from test_engine import CPU, assert_same_weights

NET = {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [], "groups": 4, "heads": 1}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from conftest import make_cfg

    root = tmp_path_factory.mktemp("shapes")
    prepare.run(make_cfg(source="shapes", image_size=8, test_fraction=0.25, min_rows=8, min_per_class=1,
                         shapes={"n_objects": 16, "views_per_object": 3}), root)
    prep = load_prepared(root / "data/prepared")
    prep.release_test()
    return prep


class Counting(ImageRows):
    """An ImageRows that records how many rows each read asked for."""

    def __init__(self, array):
        super().__init__(array)
        self.reads: list[int] = []

    def __getitem__(self, idx):
        self.reads.append(len(range(*idx.indices(len(self)))) if isinstance(idx, slice) else len(np.asarray(idx).reshape(-1)))
        return super().__getitem__(idx)


# ---------------------------------------------------------------- (b) 3D SODA training reads objects by index
def test_object_views_read_the_grouped_rows_exactly(shapes):
    ids = torch.from_numpy(shapes.array("train", "object_ids"))
    poses = torch.from_numpy(shapes.array("train", "poses"))
    old, old_poses = group_views(shapes.images_float("train"), poses, ids)  # (n_obj, V, C, H, W) in memory
    rows = Counting(shapes.images("train"))
    views = ObjectViews(rows, view_index(ids))
    assert views.shape == tuple(old.shape) and len(views) == len(old)
    pick = torch.tensor([3, 0, len(old) - 1])
    assert torch.equal(views[pick], old[pick]) and torch.equal(views[1:3], old[1:3])
    assert rows.reads == [3 * old.shape[1], 2 * old.shape[1]]  # only the picked objects' views
    data, pose_dim = training_data(shapes)
    assert isinstance(data["images"], ObjectViews) and torch.equal(data["poses"], old_poses) and pose_dim == 3
    assert check_data(data, 2) == len(old)


def test_object_views_refuse_bad_inputs_by_name(shapes):
    rows = shapes.image_rows("train")
    with pytest.raises(TypeError, match="ObjectViews: rows must be an ImageRows"):
        ObjectViews(shapes.images_float("train"), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ObjectViews: index must be an int64 \(n_objects, views\)"):
        ObjectViews(rows, torch.zeros(4, dtype=torch.long))
    with pytest.raises(IndexError, match="ObjectViews: index holds rows outside"):
        ObjectViews(rows, torch.tensor([[0, len(rows)]]))
    with pytest.raises(ValueError, match="objects have between 1 and 2 views"):
        view_index(torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("micro", [0, 2])
def test_3d_soda_trains_bit_identically_from_memory_mapped_views(shapes, tmp_path, micro):
    """The old path (every train view as floats, regrouped in memory) against ObjectViews: same losses, weights."""
    ids, poses = (torch.from_numpy(shapes.array("train", f)) for f in ("object_ids", "poses"))
    images, grouped = group_views(shapes.images_float("train"), poses, ids)
    cfg = SodaConfig.model_validate({"z_dim": 6, "encoder": {"width": 8, "stages": 2}, "unet": NET})
    tc = TrainConfig(steps=5, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=100, micro_batch=micro)
    results = []
    for i, data in enumerate(({"images": images, "poses": grouped}, training_data(shapes)[0])):
        torch.manual_seed(0)
        tr = Trainer(Soda(cfg, shapes.image_shape, pose_dim=3), tc, CPU, data, seed=1, ckpt_dir=tmp_path / str(i),
                     fingerprint="f", progress=False)
        results.append((tr.fit(), tr.rows))
    (old, old_rows), (new, new_rows) = results
    assert old_rows == new_rows and len(new_rows) == 5  # every logged loss, term, lr and grad norm
    assert_same_weights(old.model, new.model)
    assert_same_weights(old.ema, new.ema)
