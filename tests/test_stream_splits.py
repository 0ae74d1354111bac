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
    with pytest.raises(TypeError, match=r"ObjectViews: rows must be an ImageRows .* got memmap \(24, 3, 8, 8\)"):
        ObjectViews(shapes.images("train"), torch.zeros(2, 2, dtype=torch.long))  # uint8, not float rows
    index = view_index(torch.from_numpy(shapes.array("train", "object_ids")))
    assert torch.equal(ObjectViews(shapes.images_float("train"), index)[:2], ObjectViews(rows, index)[:2])
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


# ---------------------------------------------------------------- (c) shapes_eval: pose means, factor reader, DCI's PCA
def test_pose_bin_means_stream_the_train_rows(shapes):
    from diffrep.eval import nvs

    x, poses = shapes.images_float("train"), torch.from_numpy(shapes.array("train", "poses"))
    ids = nvs.pose_bins(poses, 3, 2)
    old = x.mean(0, keepdim=True).repeat(6, 1, 1, 1)  # the in-memory float32 means this replaced
    for b in ids.unique().tolist():
        old[b] = x[ids == b].mean(0)
    rows = Counting(shapes.images("train"))
    new = nvs.pose_bin_means(rows, poses, (3, 2), batch_size=5)
    assert max(rows.reads) <= 5 and sum(rows.reads) == len(x)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)  # float64 sums: only float32 rounding differs
    assert torch.equal(new, nvs.pose_bin_means(x, poses, (3, 2), batch_size=len(x)))  # any batch size, same bits


def test_factor_reader_reads_rows_in_batches_and_predicts_as_before(shapes):
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier

    from diffrep.eval.control import FactorReader
    from diffrep.eval.dci import discretize

    f, test_f = shapes.array("train", "factors"), shapes.array("test", "factors")
    kw = {"bins": 3, "pca_dim": 4, "n_estimators": 5, "seed": 0}
    # the reader this replaced: every train and test row as floats in memory, one PCA transform of each
    flat, test_flat = (shapes.images_float(s).flatten(1).numpy() for s in ("train", "test"))
    pca = PCA(n_components=4, random_state=0).fit(flat)
    y = discretize(f, f[:1], 3)[0]
    forests = [RandomForestClassifier(n_estimators=5, min_samples_leaf=2, n_jobs=-1, random_state=0)
               .fit(pca.transform(flat), y[:, k]) for k in range(y.shape[1])]
    old = np.stack([m.predict(pca.transform(test_flat)) for m in forests], 1)
    rows, test_rows = Counting(shapes.images("train")), Counting(shapes.images("test"))
    new = FactorReader(rows, f, **kw, batch_size=5)
    assert rows.reads[0] == len(rows) and max(rows.reads[1:]) <= 5  # the PCA fit (N <= fit_rows), then batches
    assert np.array_equal(new.predict(test_rows), old) and max(test_rows.reads) <= 5
    np.testing.assert_array_equal(new.features(shapes.image_rows("test")), pca.transform(test_flat))
    rows.reads.clear()
    capped = FactorReader(rows, f, **kw, fit_rows=10, batch_size=5)  # the PCA sees a fixed draw of 10 rows
    assert rows.reads[0] == 10 and max(rows.reads[1:]) <= 5 and capped.predict(test_rows).shape == test_f.shape
    with pytest.raises(ValueError, match="FactorReader: 24 training images but 23 factor rows"):
        FactorReader(rows, f[:-1], **kw)


def test_pca_of_pixels_projects_test_rows_in_batches_exactly(shapes):
    from sklearn.decomposition import PCA

    from diffrep.eval.features import pca_features

    train, test = shapes.images_float("train")[:20], Counting(shapes.images("test"))
    ref = PCA(n_components=4, svd_solver="full", random_state=0).fit(train.flatten(1).numpy())
    tr, te = pca_features(train, test, dim=4, seed=0, batch_size=5)
    assert np.array_equal(te.numpy(), ref.transform(shapes.images_float("test").flatten(1).numpy()))
    assert np.array_equal(tr.numpy(), ref.transform(train.flatten(1).numpy())) and max(test.reads) <= 5


# ---------------------------------------------------------------- (a) the pixel baselines read their rows in batches
def test_pixel_features_probe_and_knn_exactly_as_the_in_memory_copy(shapes, monkeypatch):
    from diffrep.config import LinearProbeConfig
    from diffrep.eval import features
    from diffrep.eval.probe import KNN_NORMALIZATIONS, Probe, normalize_for_knn

    monkeypatch.setattr(features, "BLOCK", 5)  # the kNN's training side and the probe's evaluation: 5 rows a read
    tr, te = Counting(shapes.images("train")), Counting(shapes.images("test"))
    src = (features.pixels(tr), features.pixels(te))
    dense = tuple(shapes.images_float(s).flatten(1) for s in ("train", "test"))  # what pixels() used to return
    assert src[0].shape == tuple(dense[0].shape) and torch.equal(src[0][torch.tensor([4, 1])], dense[0][[4, 1]])
    y, test_y = (torch.from_numpy(shapes.labels(s)) for s in ("train", "test"))
    probe = Probe(LinearProbeConfig(seeds=(0, 1), epochs=3, batch_size=8, knn_k=(1, 3, 5), bootstrap=100),
                  y, shapes.num_classes, run_seed=0)
    choice = probe.choose(src, test_y)
    assert choice == probe.choose(dense, test_y)
    (a, sa), (b, sb) = probe.report([src], test_y, choice), probe.report([dense], test_y, choice)
    assert a == b and all(torch.equal(sa[c], sb[c]) for c in sa)
    for how in KNN_NORMALIZATIONS:
        assert torch.equal(probe.knn(normalize_for_knn(*src, how), test_y, 3), probe.knn(normalize_for_knn(*dense, how), test_y, 3))
    assert tr.reads and max(tr.reads) <= 8  # the 24 train rows are never read whole: probe batches, kNN blocks
    with pytest.raises(ValueError, match=r"RowFeatures: rows must be a non-empty \(N, ...\)"):
        features.RowFeatures(torch.zeros(0, 3))


def test_the_benchmarks_synthetic_3d_folder_loads_and_groups(tmp_path):
    from bench.data_scale import write_synthetic

    write_synthetic(tmp_path / "p", 103, views=5)  # whole objects in every split
    prep = load_prepared(tmp_path / "p")  # every file hashed as the manifest says
    data, pose_dim = training_data(prep)
    assert pose_dim == 3 and data["images"].shape == (14, 5, 1, 16, 16) and data["poses"].shape == (14, 5, 3)
