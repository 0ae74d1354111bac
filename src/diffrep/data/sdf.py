"""The shape classes of `shapes` as signed distance fields, and the sphere tracing done on them.

Each class is an SDF in its local frame (centre at the origin, unit scale,
standing on the floor at y = -BOTTOM[k]); `trace` finds ray hits, `normal` the
surface normal, `soft_shadow` and `occlusion` the shading terms that march the
field. Elementwise float32 numpy throughout, so a render is bit-reproducible.
"""
from __future__ import annotations

import math

import numpy as np

SHAPE_NAMES = ["sphere", "cube", "cylinder", "cone", "torus", "capsule", "pyramid", "octahedron"]

# Per class: distance from the local centre to the floor (the object's half
# height) and a bounding-sphere radius around the local centre, both unscaled.
BOTTOM = np.array([0.80, 0.62, 0.62, 0.75, 0.30, 0.92, 0.70, 0.90], np.float32)
BOUND = np.array([0.82, 1.05, 0.9, 1.12, 0.98, 0.94, 1.23, 0.92], np.float32)

_F32 = np.float32
_MAX_STEPS, _HIT_EPS = 96, 1e-3


def sdf(k: int, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Signed distance to shape class `k` in its local frame (centre at 0, unit scale).

    Max-of-planes shapes (cone, pyramid, octahedron) return a lower bound of the
    distance, which sphere tracing only needs to be conservative.
    """
    if k == 0:  # sphere
        return np.sqrt(x * x + y * y + z * z) - _F32(0.8)
    if k == 1:  # cube, slightly rounded so its edges catch the light
        qx, qy, qz = np.abs(x) - _F32(0.56), np.abs(y) - _F32(0.56), np.abs(z) - _F32(0.56)
        ox, oy, oz = np.maximum(qx, 0), np.maximum(qy, 0), np.maximum(qz, 0)
        inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)
        return np.sqrt(ox * ox + oy * oy + oz * oz) + inside - _F32(0.06)
    if k == 2:  # cylinder, radius 0.62, half height 0.62
        dr = np.sqrt(x * x + z * z) - _F32(0.62)
        dy = np.abs(y) - _F32(0.62)
        or_, oy = np.maximum(dr, 0), np.maximum(dy, 0)
        return np.minimum(np.maximum(dr, dy), 0) + np.sqrt(or_ * or_ + oy * oy)
    if k == 3:  # cone, base radius 0.8, height 1.5
        r, h = 0.8, 1.5
        n = math.hypot(h, r)
        side = (np.sqrt(x * x + z * z) * _F32(h / n) + (y - _F32(h / 2)) * _F32(r / n))
        return np.maximum(side, -y - _F32(h / 2))
    if k == 4:  # torus lying flat, ring radius 0.66, tube radius 0.3
        q = np.sqrt(x * x + z * z) - _F32(0.66)
        return np.sqrt(q * q + y * y) - _F32(0.3)
    if k == 5:  # upright capsule, segment half length 0.42, radius 0.5
        dy = y - np.clip(y, _F32(-0.42), _F32(0.42))
        return np.sqrt(x * x + dy * dy + z * z) - _F32(0.5)
    if k == 6:  # square pyramid, base half width 0.7, height 1.4
        a, h = 0.7, 1.4
        n = math.hypot(h, a)
        top = (y - _F32(h / 2)) * _F32(a / n)
        sx = np.abs(x) * _F32(h / n) + top
        sz = np.abs(z) * _F32(h / n) + top
        return np.maximum(np.maximum(sx, sz), -y - _F32(h / 2))
    if k == 7:  # octahedron standing on a vertex
        return (np.abs(x) + np.abs(y) + np.abs(z) - _F32(0.9)) * _F32(1 / math.sqrt(3))
    raise ValueError(f"shape class {k} is not one of 0..{len(SHAPE_NAMES) - 1}")


def scene_sdf(k: int, x, y, z):
    # object plus floor (local y of the floor is -bottom), for ambient occlusion
    return np.minimum(sdf(k, x, y, z), y + BOTTOM[k])


def normal(k: int, x, y, z):
    """Unit SDF gradient by tetrahedral differences (4 evaluations)."""
    e = _F32(1e-3)
    nx = np.zeros_like(x)
    ny, nz = np.zeros_like(x), np.zeros_like(x)
    for sx, sy, sz in ((1, -1, -1), (-1, -1, 1), (-1, 1, -1), (1, 1, 1)):
        d = sdf(k, x + sx * e, y + sy * e, z + sz * e)
        nx += sx * d
        ny += sy * d
        nz += sz * d
    inv = 1 / np.maximum(np.sqrt(nx * nx + ny * ny + nz * nz), _F32(1e-12))
    return nx * inv, ny * inv, nz * inv


def sphere_hit(ox, oy, oz, dx, dy, dz, radius):
    """Entry/exit distances of unit-direction rays through a sphere at 0 (nan = miss)."""
    b = ox * dx + oy * dy + oz * dz
    c = ox * ox + oy * oy + oz * oz - radius * radius
    disc = b * b - c
    s = np.sqrt(np.maximum(disc, 0))
    miss = disc <= 0
    return np.where(miss, np.nan, -b - s), np.where(miss, np.nan, -b + s)


def trace(k: int, ox, oy, oz, dx, dy, dz, t0, t1):
    """Sphere-trace rays from t0 to t1; returns the hit distance (inf = miss).

    Finished rays are dropped every step so the cost follows the live rays.
    """
    t_hit = np.full(ox.shape, np.inf, _F32)
    idx = np.arange(ox.size)
    t = t0.copy()
    for _ in range(_MAX_STEPS):
        if idx.size == 0:
            break
        h = sdf(k, ox[idx] + t * dx[idx], oy[idx] + t * dy[idx], oz[idx] + t * dz[idx])
        hit = h < _HIT_EPS * np.maximum(t, 1)
        t_hit[idx[hit]] = t[hit]
        t = t + h
        live = ~hit & (t < t1[idx])
        idx, t = idx[live], t[live]
    return t_hit


def soft_shadow(k: int, px, py, pz, radius, light):
    """Light visibility in [0, 1] of local points towards the unit direction `light`
    (three float32), a soft shadow through the SDF."""
    lx, ly, lz = light
    vis = np.ones(px.shape, _F32)
    t0, t1 = sphere_hit(px, py, pz, lx, ly, lz, radius)
    idx = np.nonzero(t1 > 0)[0]  # nan compares false: rays that miss the object
    t = np.maximum(t0[idx], _F32(0.02))
    t1 = t1[idx]
    res = np.ones(idx.shape, _F32)
    for _ in range(40):
        if idx.size == 0:
            break
        h = sdf(k, px[idx] + t * lx, py[idx] + t * ly, pz[idx] + t * lz)
        res = np.minimum(res, _F32(10) * h / t)  # penumbra: near misses darken
        vis[idx] = np.clip(res, 0, 1)
        t = t + np.clip(h, _F32(0.01), _F32(0.25))
        live = (h > _HIT_EPS) & (t < t1)
        idx, t, t1, res = idx[live], t[live], t1[live], res[live]
    return vis


def occlusion(k: int, px, py, pz, nx, ny, nz):
    """Ambient occlusion in [0, 1] from 4 scene-SDF samples along the normal."""
    occ = np.zeros(px.shape, _F32)
    for i, h in enumerate((0.06, 0.16, 0.32, 0.55)):
        h = _F32(h)
        d = scene_sdf(k, px + h * nx, py + h * ny, pz + h * nz)
        occ += _F32(0.5**i) * np.clip((h - d) / h, 0, 1)
    return np.clip(1 - _F32(0.75 / 1.875) * occ, 0, 1)
