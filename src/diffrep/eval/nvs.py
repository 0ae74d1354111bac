"""Novel-view synthesis of 3D objects (SODA's second claim), with baselines, intervals and paired tests.

Every test object has V views. The target is its last view; the sources are its
first k views (k = 1, 2, 3, ...), encoded and averaged in z (the paper's
multi-view setting), then decoded at the target's pose. Every k decodes from the
same noise per object, so the curve against k is paired. Baselines in the same
run: copy the first source view; the training split's mean image of the
target's pose bin (azimuth x elevation). Scores per object: PSNR, SSIM; FD in
the feature-net space against the set of true target views (eval/distances).
"""
from __future__ import annotations

import torch

from diffrep.eval.intervals import bootstrap_mean
from diffrep.eval.paired import paired_test
from diffrep.eval.recon import psnr_per_image, ssim_per_image


def multi_view_z(model, sources: torch.Tensor) -> torch.Tensor:
    """(n, k, C, H, W) source views -> (n, z_dim): the mean of their codes.

    Taken as z_1 + mean(z_i - z_1), which is exactly z_1 when the views' codes are equal (a plain mean of
    k equal floats can be 1 ulp off, and the decoder's sampling loop can grow that to 1e-4 in the render)."""
    n, k = sources.shape[:2]
    z = model.encode(sources.flatten(0, 1)).unflatten(0, (n, k))  # (n, k, z_dim)
    return z[:, 0] + (z - z[:, :1]).mean(1)


def pose_bins(poses: torch.Tensor, az_bins: int, el_bins: int) -> torch.Tensor:
    """(N, 3) poses (sin az, cos az, elevation) -> (N,) bin ids, equal-width in azimuth and elevation."""
    from diffrep.data.shapes import AZIMUTH_RANGE, ELEVATION_RANGE

    az = torch.atan2(poses[:, 0], poses[:, 1])
    a = ((az - AZIMUTH_RANGE[0]) / (AZIMUTH_RANGE[1] - AZIMUTH_RANGE[0]) * az_bins).long().clamp(0, az_bins - 1)
    e = ((poses[:, 2] - ELEVATION_RANGE[0]) / (ELEVATION_RANGE[1] - ELEVATION_RANGE[0]) * el_bins).long()
    return a * el_bins + e.clamp(0, el_bins - 1)


def pose_bin_means(train_x, train_poses: torch.Tensor, bins: tuple[int, int], batch_size: int = 1000) -> torch.Tensor:
    """(n_bins, C, H, W): the training split's mean image per pose bin (the overall mean where a bin is empty).

    train_x: (N, C, H, W) rows, a tensor or a memory-mapped ImageRows, read `batch_size` rows at a time into
    float64 sums per bin (so the means do not depend on the batch size, and differ from a float32 mean of the
    whole split only in float32 rounding)."""
    ids = pose_bins(train_poses, *bins)  # (N,)
    n_bins = bins[0] * bins[1]
    sums = torch.zeros((n_bins, *train_x.shape[1:]), dtype=torch.float64)  # (n_bins, C, H, W)
    for i in range(0, len(train_x), batch_size):
        sums.index_add_(0, ids[i : i + batch_size], train_x[i : i + batch_size].double())
    counts = torch.bincount(ids, minlength=n_bins).double()  # (n_bins,)
    overall = sums.sum(0, keepdim=True) / len(ids)
    per_bin = sums / counts.clamp_min(1).view(-1, *[1] * (sums.ndim - 1))
    return torch.where(counts.view(-1, *[1] * (sums.ndim - 1)) > 0, per_bin, overall).float()


def synthesise(model, views: torch.Tensor, poses: torch.Tensor, ks: tuple[int, ...], *, seed: int,
               steps: int | None = None, batch_size: int = 100) -> dict[int, torch.Tensor]:
    """views (n, V, C, H, W), poses (n, V, P) -> {k: (n, C, H, W) renders of the last view from the first k}."""
    n, V = views.shape[:2]
    if max(ks) >= V:
        raise ValueError(f"novel views: k={max(ks)} source views need objects with more than {max(ks)} views, got V={V}")
    noise = torch.randn((n, *views.shape[2:]), generator=torch.Generator().manual_seed(seed))  # shared over k
    dev = next(model.parameters()).device
    out = {}
    for k in ks:
        parts = []
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            z = multi_view_z(model, views[sl, :k].to(dev))
            parts.append(model.decode(z, poses[sl, -1].to(dev), noise=noise[sl].to(dev), steps=steps).cpu())
        out[k] = torch.cat(parts)
    return out


def score_table(preds: dict[str, torch.Tensor], target: torch.Tensor, *, resamples: int, seed: int,
                against: list[tuple[str, str]]) -> dict:
    """Per-method PSNR/SSIM means with bootstrap intervals over objects, and paired tests of `against` pairs."""
    per = {name: {"psnr": psnr_per_image(p, target), "ssim": ssim_per_image(p, target)} for name, p in preds.items()}
    table = {name: {m: float(v.mean()) for m, v in s.items()} | {f"{m}_ci95": list(bootstrap_mean(v, resamples=resamples,
                                                                                                 seed=seed))
                                                                  for m, v in s.items()}
             for name, s in per.items()}
    paired = []
    for a, b in against:
        for m in ("psnr", "ssim"):
            da, db = per[a][m], per[b][m]
            row = paired_test(da, db, resamples=resamples, seed=seed)
            paired.append({"a": a, "b": b, "metric": m, "diff": row["diff"], "p_value": row["p_value"],
                           "diff_ci95": list(bootstrap_mean(da - db, resamples=resamples, seed=seed)),
                           "verdict": row["verdict"], "test": row["test"]})
    return {"methods": table, "paired": paired, "n_objects": len(target)}
