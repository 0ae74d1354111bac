"""The procedural 3D shapes source: determinism, factors, poses, coverage, closed forms."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from diffrep.data import sdf
from diffrep.data import shapes as S
from diffrep.data.shapes import render_factors, render_shapes, sample_factors

K = len(S.SHAPE_NAMES)


@pytest.fixture(scope="module")
def ds():
    return render_shapes(n_objects=2 * K + 1, views_per_object=3, image_size=16, seed=0)


def test_layout_and_dtypes(ds):
    n = (2 * K + 1) * 3
    assert ds.source == "shapes" and len(ds) == n
    assert ds.images.shape == (n, 3, 16, 16) and ds.images.dtype == np.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
    assert ds.class_names == S.SHAPE_NAMES and K >= 6
    assert ds.factors.shape == (n, 7) and ds.factors.dtype == np.float32
    assert ds.factor_names == ["shape", "object_hue", "floor_hue", "wall_hue", "scale",
                               "azimuth", "elevation"]
    assert ds.poses.shape == (n, 3) and ds.poses.dtype == np.float32
    assert ds.pose_layout == ["sin_azimuth", "cos_azimuth", "elevation"]
    assert ds.object_ids.shape == (n,) and ds.object_ids.dtype == np.int64
    assert ds.unreadable == [] and ds.empty_classes == []
    assert len(set(ds.ids)) == n
    assert ds.ids[4] == "shapes[obj=1,view=1]"
    for i, o in zip(ds.ids, ds.object_ids):
        assert int(re.fullmatch(r"shapes\[obj=(\d+),view=\d+\]", i).group(1)) == o


def test_values_finite_in_unit_range(ds):
    assert np.isfinite(ds.images).all()
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert ds.images.std() > 0.05  # not a blank render


def test_deterministic_per_seed():
    a = render_shapes(8, 2, 8, seed=3)
    b = render_shapes(8, 2, 8, seed=3)
    c = render_shapes(8, 2, 8, seed=4)
    for name in ("images", "factors", "poses", "labels", "object_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.ids == b.ids
    assert not np.array_equal(a.factors, c.factors) and not np.array_equal(a.images, c.images)
    np.testing.assert_array_equal(render_shapes(8, 2, 8, seed=3, progress=True).images, a.images)


def test_rendering_is_a_pure_function_of_factors(ds):
    # a subset, in another order and batch, re-renders bit-identically (novel views on demand)
    rows = np.array([7, 0, 30])
    images, _ = render_factors(ds.factors[rows], 16)
    np.testing.assert_array_equal(images, ds.images[rows])


def test_factor_ranges(ds):
    f = ds.factors
    np.testing.assert_array_equal(f[:, 0], ds.labels.astype(np.float32))
    assert (f[:, 1:4] >= 0).all() and (f[:, 1:4] < 1).all()
    assert (f[:, 4] >= S.SCALE_RANGE[0]).all() and (f[:, 4] <= S.SCALE_RANGE[1]).all()
    eps = 1e-6
    assert (f[:, 5] >= S.AZIMUTH_RANGE[0] - eps).all() and (f[:, 5] <= S.AZIMUTH_RANGE[1] + eps).all()
    assert (f[:, 6] >= S.ELEVATION_RANGE[0] - eps).all() and (f[:, 6] <= S.ELEVATION_RANGE[1] + eps).all()
    assert abs(S.AZIMUTH_RANGE[1] - math.radians(70)) < 1e-9
    for j in (2, 3):  # floor and wall hue stay away from the object's hue (circularly)
        gap = np.abs(f[:, j] - f[:, 1])
        assert (np.minimum(gap, 1 - gap) >= S.MIN_HUE_GAP - 1e-5).all()


def test_classes_present_and_balanced():
    f, _ = sample_factors(n_objects=5 * K + 3, views_per_object=2, seed=1)
    per_object = f[::2, 0].astype(int)
    counts = np.bincount(per_object, minlength=K)
    assert counts.min() >= 5 and counts.max() - counts.min() <= 1


def test_views_share_object_factors_and_differ_in_pose(ds):
    f = ds.factors
    for o in np.unique(ds.object_ids):
        rows = f[ds.object_ids == o]
        assert len(rows) == 3
        assert (rows[:, :5] == rows[0, :5]).all()
        assert len(np.unique(rows[:, 5])) == 3 and len(np.unique(rows[:, 6])) == 3
        assert not np.array_equal(ds.images[ds.object_ids == o][0], ds.images[ds.object_ids == o][1])


def test_poses_match_angles(ds):
    az, el = ds.factors[:, 5].astype(np.float64), ds.factors[:, 6]
    np.testing.assert_allclose(ds.poses[:, 0], np.sin(az), atol=1e-6)
    np.testing.assert_allclose(ds.poses[:, 1], np.cos(az), atol=1e-6)
    np.testing.assert_array_equal(ds.poses[:, 2], el)


def _grid_factors(k: int) -> np.ndarray:
    # extremes of scale, azimuth and elevation for class k
    rows = [[k, 0.0, 0.5, 0.3, s, a, e] for s in S.SCALE_RANGE for a in S.AZIMUTH_RANGE + (0.0,)
            for e in S.ELEVATION_RANGE]
    return np.array(rows, np.float32)


@pytest.mark.parametrize("k", range(K))
def test_object_visible_in_frame(k):
    f = _grid_factors(k)
    images, cov = render_factors(f, 16)
    frac = cov.mean((1, 2))
    assert (frac > 0.05).all() and (frac < 0.6).all(), (S.SHAPE_NAMES[k], frac)
    assert cov[:, [0, -1], :].max() < 0.5 and cov[:, :, [0, -1]].max() < 0.5  # not cut off by the frame
    for img, c in zip(images, cov):  # the red object stands out from the cyan floor and green wall
        obj, bg = img[:, c == 1], img[:, c == 0]
        assert obj.size and bg.size
        assert np.abs(obj.mean(1) - bg.mean(1)).max() > 0.15


def test_lit_floor_matches_lambert_closed_form():
    # front-left floor corner at high elevation: unshadowed, unoccluded, fully on the floor
    f = np.array([[0, 0.0, 0.25, 0.6, 1.0, 0.0, S.ELEVATION_RANGE[1]]], np.float32)
    images, cov = render_factors(f, 16)
    albedo = S._hsv_to_rgb(np.array([0.25]), *S.FLOOR_SV)[0]
    light = S.AMBIENT + S.SKY + S.DIFFUSE * S.LIGHT[1]
    np.testing.assert_allclose(images[0, :, -1, 0], albedo * light, rtol=1e-5)
    assert cov[0, -1, 0] == 0


@pytest.mark.parametrize("k", range(K))
def test_sdf_bounds_and_floor_contact(k):
    rng = np.random.default_rng(k)
    v = rng.normal(size=(3, 20000)).astype(np.float32)
    v /= np.linalg.norm(v, axis=0)
    assert (sdf.sdf(k, *(v * (sdf.BOUND[k] - 1e-3))) > 0).all()  # the bounding sphere holds the shape
    g = np.linspace(-1.5, 1.5, 301, dtype=np.float32)
    x, z = np.meshgrid(g, g)
    on_floor = sdf.sdf(k, x, np.full_like(x, -sdf.BOTTOM[k]), z)
    below = sdf.sdf(k, x, np.full_like(x, -sdf.BOTTOM[k] - 0.02), z)
    assert on_floor.min() <= 1e-3 and (below > 0).all()  # stands on the floor, not in it
    assert sdf.sdf(k, *np.zeros((3, 1), np.float32))[0] < 0 or k == 4  # the torus has a hole


def test_sphere_sdf_is_exact():
    p = np.array([[0.0, 2.0, 0.3], [0.0, 0.0, 0.4], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(sdf.sdf(0, *p), [-0.8, 1.2, -0.3], atol=1e-6)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="n_objects"):
        render_shapes(0, 2, 16, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        render_shapes(2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="factors must be"):
        render_factors(np.zeros((3, 5), np.float32), 16)
    with pytest.raises(ValueError, match="class index"):
        render_factors(np.array([[K, 0, 0.5, 0.5, 1, 0, 0.3]], np.float32), 16)
