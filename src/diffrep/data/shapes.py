"""`shapes`: a procedural 3D scene renderer with known generative factors.

A small room in the spirit of DeepMind's 3dshapes: a floor (y = 0), four walls
(a back wall close behind the object, side and front walls around the camera),
and one object standing on the floor at the origin. A camera orbits the object
at a fixed distance and looks at it (at AIM = 0.85 of its centre height, so
wide bases and tall tops both stay in frame): the largest objects fill about
3/4 of the frame height, the mean object about 20% of the pixels. A fixed
directional light gives Lambertian shading plus a hemispheric ambient term, a
soft shadow traced through the object's signed distance field, and a little
ambient occlusion where the object meets the floor. Objects are sphere-traced
(SDF, data/sdf.py), the room is intersected analytically; everything is batched numpy over
chunks of images, one shape class at a time. Each image is rendered at
`supersample` x the final size (at least 64 px) and box-filtered down.

Factors (one row per image, `FACTOR_NAMES`):
  shape       class index as a float, in [0, len(SHAPE_NAMES)); classes are
              balanced (counts differ by at most one object).
  object_hue  in [0, 1), uniform.
  floor_hue   in [0, 1), uniform; its circular distance to object_hue is at
  wall_hue    least MIN_HUE_GAP (0.15) so the object never blends into the
              room. Floor and wall are less saturated than the object.
  scale       uniform in SCALE_RANGE = [0.75, 1.25] (object size multiplier).
  azimuth     radians, uniform in +-70 degrees: the camera stays in front of
              the back wall (0 = looking straight at it, + = camera to +x).
  elevation   radians, uniform in [10, 40] degrees above the horizon.
shape, hues and scale are per object (shared by its views); azimuth and
elevation are drawn per view. Poses (`POSE_LAYOUT`) are
(sin azimuth, cos azimuth, elevation), the pose embedding the SODA decoder
gets for novel-view synthesis. `render_factors` renders any factor rows, so a
held-out view of a known object can be rendered on demand.

Rendering is a pure function of the factors (elementwise float32 numpy, no
threads, no reductions across images), so a seed re-renders bit-identically.
"""
from __future__ import annotations

import math

import numpy as np

from diffrep.data.sdf import BOTTOM, BOUND, SHAPE_NAMES, normal, occlusion, soft_shadow, trace
from diffrep.data.types import RawDataset

FACTOR_NAMES = ["shape", "object_hue", "floor_hue", "wall_hue", "scale", "azimuth", "elevation"]
POSE_LAYOUT = ["sin_azimuth", "cos_azimuth", "elevation"]
SCALE_RANGE = (0.75, 1.25)
AZIMUTH_RANGE = (-math.radians(70.0), math.radians(70.0))
ELEVATION_RANGE = (math.radians(10.0), math.radians(40.0))
MIN_HUE_GAP = 0.15

# Scene constants (world units; the unscaled objects are about 1.6 across).
CAM_DIST = 4.4  # orbit radius around the object's centre
FOV = math.radians(38.0)  # full vertical field of view
AIM = 0.85  # the camera looks at this fraction of the object's centre height
BACK_WALL, FRONT_WALL, SIDE_WALL = -2.2, 5.0, 4.6  # z of back/front walls, |x| of side walls
LIGHT = np.array([-0.5, 1.0, 0.6]) / np.linalg.norm([-0.5, 1.0, 0.6])  # towards the light
AMBIENT, SKY, DIFFUSE = 0.18, 0.17, 0.68  # ambient + SKY * up-facing + DIFFUSE * lambert
# (saturation, value) of the hues: a vivid object in a paler room
OBJECT_SV, FLOOR_SV, WALL_SV = (0.85, 0.92), (0.5, 0.85), (0.4, 0.8)

_F32 = np.float32
_CHUNK_RAYS = 1 << 17  # rays per batch: amortises numpy call overhead, temporaries stay in L2


# ---------------------------------------------------------------- colours
def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB; h, s, v broadcast, result (..., 3)."""
    h = np.asarray(h, np.float64)
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    rgb = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return rgb.astype(_F32)


# ---------------------------------------------------------------- camera and room
def _cameras(k: int, scale: np.ndarray, azimuth: np.ndarray, elevation: np.ndarray, res: int):
    """Per-image camera position (B, 3) and per-pixel unit ray directions, each (B, res*res)."""
    scale, azimuth, elevation = (np.asarray(a, np.float64) for a in (scale, azimuth, elevation))
    # aim a little below the centre: the near base rim of wide shapes (cone, pyramid)
    # drops in the frame as the camera rises
    target = np.stack([np.zeros_like(scale), AIM * scale * float(BOTTOM[k]), np.zeros_like(scale)], -1)
    ce = np.cos(elevation)
    cam = target + CAM_DIST * np.stack([ce * np.sin(azimuth), np.sin(elevation), ce * np.cos(azimuth)], -1)
    fwd = target - cam
    fwd /= np.linalg.norm(fwd, axis=-1, keepdims=True)  # (B, 3)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    up = np.cross(right, fwd)
    u = ((np.arange(res) + 0.5) / res * 2 - 1) * math.tan(FOV / 2)
    sx = np.tile(u, res)[None]  # (1, P) column offset of each pixel
    sy = -np.repeat(u, res)[None]  # (1, P) row offset; image rows run downwards
    d = [(fwd[:, i:i + 1] + sx * right[:, i:i + 1] + sy * up[:, i:i + 1]).astype(_F32) for i in range(3)]
    inv = 1 / np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    return cam.astype(_F32), d[0] * inv, d[1] * inv, d[2] * inv


def _room(ox, oy, oz, dx, dy, dz):
    """Distance to the room (floor or a wall) per ray, and which surface: 0 floor, 1 x wall, 2 z wall."""
    with np.errstate(divide="ignore"):
        tf = np.where(dy < 0, -oy / dy, np.inf)
        tx = (np.copysign(_F32(SIDE_WALL), dx) - ox) / dx  # +inf when dx == 0
        tz = (np.where(dz > 0, _F32(FRONT_WALL), _F32(BACK_WALL)) - oz) / dz
    txz = np.minimum(tx, tz)
    surface = np.where(tf <= txz, 0, np.where(tx <= tz, 1, 2)).astype(np.int8)
    return np.minimum(tf, txz).astype(_F32), surface


# ---------------------------------------------------------------- one batch of one class
def _render_class(k: int, f: np.ndarray, res: int):
    """Render factor rows `f` (B, 7) of shape class k at res x res; (B, 3, res, res), coverage.

    Full-frame work is (B, P) arrays with per-image (B, 1) camera terms
    broadcast; object rays, shadow rays and occlusion run on compacted subsets.
    """
    b, p = len(f), res * res
    cam, dx, dy, dz = _cameras(k, f[:, 4], f[:, 5], f[:, 6], res)
    s = f[:, 4:5].astype(_F32)  # (B, 1)
    inv_s = 1 / s
    cy = s * BOTTOM[k]  # object centre height
    ox, oy, oz = cam[:, 0:1], cam[:, 1:2], cam[:, 2:3]
    lx, ly, lz = (float(v) for v in LIGHT)

    # room: every ray hits it; shade it in the object's local (unscaled) frame
    t_room, surface = _room(ox, oy, oz, dx, dy, dz)
    lox, loy, loz = ox * inv_s, (oy - cy) * inv_s, oz * inv_s  # (B, 1) local camera
    t_loc = t_room * inv_s  # local t = world t / scale (no rotation)
    px, py, pz = lox + t_loc * dx, loy + t_loc * dy, loz + t_loc * dz
    # lambert term (shadowed below) and ambient term; walls face +-x or +-z, the floor +y
    direct = np.where(surface == 0, ly, np.where(surface == 1, np.maximum(-np.sign(dx) * lx, 0),
                                                    np.maximum(-np.sign(dz) * lz, 0))).astype(_F32)
    light = (AMBIENT + SKY * (0.5 + 0.5 * (surface == 0))).astype(_F32)  # (B, P)

    # object: sphere-trace rays that enter its bounding sphere
    bb = lox * dx + loy * dy + loz * dz
    disc = bb * bb - (lox * lox + loy * loy + loz * loz - BOUND[k] ** 2)
    cand = np.flatnonzero((disc > 0) & (bb < 0))
    img = cand // p
    root = np.sqrt(disc.ravel()[cand])
    cdx, cdy, cdz = dx.ravel()[cand], dy.ravel()[cand], dz.ravel()[cand]
    cox, coy, coz = lox[img, 0], loy[img, 0], loz[img, 0]
    t_obj = trace(k, cox, coy, coz, cdx, cdy, cdz, -bb.ravel()[cand] - root, -bb.ravel()[cand] + root)
    h = np.isfinite(t_obj)
    hit, t_obj = cand[h], t_obj[h]
    qx, qy, qz = cox[h] + t_obj * cdx[h], coy[h] + t_obj * cdy[h], coz[h] + t_obj * cdz[h]
    nx, ny, nz = normal(k, qx, qy, qz)
    for a, v in ((px, qx), (py, qy), (pz, qz)):
        a.ravel()[hit] = v
    light.ravel()[hit] = AMBIENT + SKY * (0.5 + 0.5 * ny)
    direct.ravel()[hit] = np.maximum(nx * lx + ny * ly + nz * lz, 0)
    covered = np.zeros(b * p, bool)
    covered[hit] = True

    # soft shadows on lit points whose ray to the light passes the object's bounding sphere
    fx, fy, fz = px.ravel(), py.ravel(), pz.ravel()
    bl = fx * lx + fy * ly + fz * lz
    towards = bl * bl - (fx * fx + fy * fy + fz * fz - BOUND[k] ** 2) > 0  # line meets the sphere
    sh = np.flatnonzero(towards & (direct.ravel() > 0))
    snx, sny, snz = _normals_at(sh, covered, hit, (nx, ny, nz), surface, dx, dz)
    off = _F32(0.02)  # leave the surface before tracing towards the light
    direct.ravel()[sh] *= soft_shadow(k, fx[sh] + off * snx, fy[sh] + off * sny, fz[sh] + off * snz,
                                      BOUND[k], tuple(_F32(v) for v in LIGHT))

    # ambient occlusion near the object (contact darkening on the floor, creases)
    near = np.flatnonzero(fx * fx + (fy + BOTTOM[k]) ** 2 + fz * fz < (BOUND[k] + 0.8) ** 2)
    anx, any_, anz = _normals_at(near, covered, hit, (nx, ny, nz), surface, dx, dz)
    light.ravel()[near] *= occlusion(k, fx[near], fy[near], fz[near], anx, any_, anz)
    light += DIFFUSE * direct  # (B, P)

    fl = surface == 0
    albedo = [_hsv_to_rgb(f[:, j], *sv) for j, sv in ((1, OBJECT_SV), (2, FLOOR_SV), (3, WALL_SV))]
    cov = covered.reshape(b, p)
    rgb = np.empty((b, 3, res, res), _F32)
    for c in range(3):
        obj_c, floor_c, wall_c = (a[:, c:c + 1] for a in albedo)
        alb = np.where(cov, obj_c, np.where(fl, floor_c, wall_c))
        rgb[:, c] = np.clip(alb * light, 0, 1).reshape(b, res, res)
    return rgb, cov.reshape(b, res, res).astype(_F32)


def _normals_at(i, covered, hit, obj_normals, surface, dx, dz):
    """Normals at flat pixel indices i: the object's where covered, else the room's."""
    srf = surface.ravel()[i]
    nx = np.where(srf == 1, -np.sign(dx.ravel()[i]), 0).astype(_F32)
    ny = (srf == 0).astype(_F32)
    nz = np.where(srf == 2, -np.sign(dz.ravel()[i]), 0).astype(_F32)
    on = covered[i]
    if on.any():
        j = np.searchsorted(hit, i[on])  # hit is sorted (flatnonzero order)
        nx[on], ny[on], nz[on] = obj_normals[0][j], obj_normals[1][j], obj_normals[2][j]
    return nx, ny, nz


def _box_down(x: np.ndarray, ss: int) -> np.ndarray:
    """Average-pool the last two axes by ss (anti-aliasing)."""
    if ss == 1:
        return x
    *lead, h, w = x.shape
    return x.reshape(*lead, h // ss, ss, w // ss, ss).mean(axis=(-3, -1), dtype=np.float32)


def render_factors(factors: np.ndarray, image_size: int, supersample: int | None = None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Render factor rows (N, 7) in FACTOR_NAMES order.

    Returns images float32 (N, 3, S, S) in [0, 1] and the object coverage
    float32 (N, S, S) in [0, 1] (fraction of each pixel's samples on the object).
    supersample defaults to enough to render at least 64 px (2x at 32, 4x at 16).
    """
    factors = np.asarray(factors, np.float32)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"shapes: factors must be (N, {len(FACTOR_NAMES)}) in order {FACTOR_NAMES}, "
                         f"got shape {factors.shape}")
    if image_size < 4:
        raise ValueError(f"shapes: image_size must be >= 4, got {image_size}")
    ss = max(2, -(-64 // image_size)) if supersample is None else supersample
    if ss < 1:
        raise ValueError(f"shapes: supersample must be >= 1, got {ss}")
    classes = factors[:, 0].astype(np.int64)
    if classes.min(initial=0) < 0 or classes.max(initial=0) >= len(SHAPE_NAMES):
        raise ValueError(f"shapes: factor 'shape' must be a class index in 0..{len(SHAPE_NAMES) - 1}")
    res = image_size * ss
    n = len(factors)
    images = np.empty((n, 3, image_size, image_size), np.float32)
    coverage = np.empty((n, image_size, image_size), np.float32)
    per_chunk = max(1, _CHUNK_RAYS // (res * res))
    # one class at a time so each sphere-tracing step evaluates one SDF
    jobs = [(k, rows[i:i + per_chunk]) for k in range(len(SHAPE_NAMES))
            for rows in [np.nonzero(classes == k)[0]] for i in range(0, len(rows), per_chunk)]
    if progress:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="shapes: rendering", unit="batch")
    for k, rows in jobs:
        rgb, cov = _render_class(k, factors[rows], res)
        images[rows] = _box_down(rgb, ss)
        coverage[rows] = _box_down(cov, ss)
    return images, coverage


# ---------------------------------------------------------------- the source
def sample_factors(n_objects: int, views_per_object: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw factors (N, 7) and object ids (N,), N = n_objects * views_per_object, object-major."""
    if n_objects < 1 or views_per_object < 1:
        raise ValueError(f"shapes: n_objects and views_per_object must be >= 1, "
                         f"got {n_objects} and {views_per_object}")
    rng = np.random.default_rng(seed)
    k = len(SHAPE_NAMES)
    shape = rng.permutation(np.arange(n_objects) % k)  # balanced classes in random order
    obj_hue = rng.random(n_objects)
    gap = MIN_HUE_GAP
    floor_hue = (obj_hue + rng.uniform(gap, 1 - gap, n_objects)) % 1.0
    wall_hue = (obj_hue + rng.uniform(gap, 1 - gap, n_objects)) % 1.0
    scale = rng.uniform(*SCALE_RANGE, n_objects)
    per_obj = np.stack([shape, obj_hue, floor_hue, wall_hue, scale], -1)  # (O, 5)
    n = n_objects * views_per_object
    az = rng.uniform(*AZIMUTH_RANGE, n)
    el = rng.uniform(*ELEVATION_RANGE, n)
    factors = np.concatenate([np.repeat(per_obj, views_per_object, axis=0), az[:, None], el[:, None]], 1)
    factors = factors.astype(np.float32)
    factors[:, 1:4] = np.minimum(factors[:, 1:4], np.float32(1 - 2**-24))  # float32 rounding can reach 1.0
    return factors, np.repeat(np.arange(n_objects, dtype=np.int64), views_per_object)


def poses_from_factors(factors: np.ndarray) -> np.ndarray:
    """(N, 7) factors -> (N, 3) poses in POSE_LAYOUT order."""
    az, el = factors[:, 5].astype(np.float64), factors[:, 6]
    return np.stack([np.sin(az), np.cos(az), el], -1).astype(np.float32)


def render_shapes(n_objects: int, views_per_object: int, image_size: int, seed: int,
                  progress: bool = False) -> RawDataset:
    """Render n_objects x views_per_object images (object-major) as a RawDataset."""
    factors, object_ids = sample_factors(n_objects, views_per_object, seed)
    images, _ = render_factors(factors, image_size, progress=progress)
    views = np.tile(np.arange(views_per_object), n_objects)
    return RawDataset(
        source="shapes",
        images=images,
        labels=factors[:, 0].astype(np.int64),
        class_names=list(SHAPE_NAMES),
        ids=[f"shapes[obj={o},view={v}]" for o, v in zip(object_ids.tolist(), views.tolist())],
        factors=factors,
        factor_names=list(FACTOR_NAMES),
        poses=poses_from_factors(factors),
        pose_layout=list(POSE_LAYOUT),
        object_ids=object_ids,
    )


def list_shapes(n_objects: int, views_per_object: int, image_size: int, seed: int):
    """`prepare`'s first pass for shapes: the scenes' factors and ids; rendering waits for the chunks."""
    from diffrep.data.decode import ShapesReader
    from diffrep.data.types import Listing

    factors, object_ids = sample_factors(n_objects, views_per_object, seed)
    views = np.tile(np.arange(views_per_object), n_objects)
    ids = [f"shapes[obj={o},view={v}]" for o, v in zip(object_ids.tolist(), views.tolist())]
    return Listing("shapes", factors[:, 0].astype(np.int64), list(SHAPE_NAMES), ids,
                   ShapesReader(factors, image_size), 3, factors=factors, factor_names=list(FACTOR_NAMES),
                   poses=poses_from_factors(factors), pose_layout=list(POSE_LAYOUT), object_ids=object_ids)
