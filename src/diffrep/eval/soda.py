"""SODA's generative evaluation: reconstructions of test images and, with poses, novel views.

One function for every caller. 2D data: encode each picked image, decode it from
pure noise, PSNR/SSIM against the image. 3D data (poses and object ids): the
picked objects' first view is the source; it is reconstructed at its own pose,
and the second view is synthesised from the source's z and the second view's
pose, beside the trivial baseline of copying the source view.
"""
from __future__ import annotations

import torch

from diffrep.eval.features import batched, spread
from diffrep.eval.grid import interleave
from diffrep.eval.recon import psnr, scores, ssim
from diffrep.train.batches import ObjectViews, view_index


def soda_views(model, images, poses: torch.Tensor | None, object_ids: torch.Tensor | None,
               pick: torch.Tensor, *, generator: torch.Generator, steps: int | None, device,
               show: int = 16) -> tuple[dict, torch.Tensor, int]:
    """-> (metrics, grid images, grid columns). `pick` indexes images (2D) or objects (3D).

    images: an ImageRows (memory-mapped test rows; 2D may also pass a tensor): only the picked rows are read."""
    if poses is None:
        src = images[pick]  # (n, C, H, W)
        rec = batched(lambda x: model.reconstruct(x, steps=steps, generator=generator), src, device=device)
        s = spread(len(src), show)
        return scores(rec, src, "recon"), interleave(src[s], rec[s]), 2
    index = view_index(object_ids)  # (n_obj, V) view rows of each object
    pick = pick[pick < len(index)]
    views, pose = ObjectViews(images, index)[pick], poses[index[pick]]  # only the picked objects' views are read
    src, tgt, src_pose, tgt_pose = views[:, 0], views[:, 1], pose[:, 0], pose[:, 1]
    rec = batched(lambda x, p: model.decode(model.encode(x), p, steps=steps, generator=generator), src, src_pose,
                  device=device)
    nv = batched(lambda x, p: model.novel_view(x, p, steps=steps, generator=generator), src, tgt_pose, device=device)
    m = scores(rec, src, "recon") | scores(nv, tgt, "novel_view") | {
        "novel_view_psnr_copy_source": psnr(src, tgt), "novel_view_ssim_copy_source": ssim(src, tgt)}
    s = spread(len(src), 12)
    return m, interleave(src[s], rec[s], tgt[s], nv[s]), 4
