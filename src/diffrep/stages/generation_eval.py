"""`generation_eval` stage: sample quality, reconstruction and disentanglement, each beside its floor.

Feature space: the in-domain classifier (models/feature_net; keys `*_featnet`).
With `eval.inception_weights` set, the standard Inception FID too (keys `inception_*`).
All sets have the same size n = min(eval.n_samples, |test|, |train|), so the
finite-sample bias of the Fréchet distance is the same in every comparison:
  fd_featnet            UL stage-2 samples (8-bit quantised like the data) vs n test images
  fd_featnet_floor      n train images vs the same n test images: real-vs-real, the best reachable
  fd_featnet_ratio      fd_featnet / fd_featnet_floor
  fd_featnet_ul_recon   UL stage-1 reconstructions of the first r = eval.recon_images of those test
                        images vs those images, beside its own floor at size r (fd_featnet_ul_recon_floor)
Reconstruction (the same r test images): UL and SODA PSNR/SSIM,
UL bits per pixel (the prior's ELBO, as in ul_stage1). With poses (shapes): SODA
novel-view PSNR/SSIM against the true view, beside copying the source view. With
factors (shapes): DCI of SODA z and UL latents, beside PCA of the pixels.

Writes results/generation_eval/ (sample and reconstruction grids) and
metrics/generation_eval.json (flat headline keys, details, lineage).
A missing SODA or UL model is skipped and listed in `missing`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from diffrep.config import Config
from diffrep.data.prepared import Prepared, load_prepared
from diffrep.eval.dci import dci
from diffrep.eval.features import batched, pca_features, quantise
from diffrep.eval.feature_net import load_feature_net
from diffrep.eval.fid import InceptionFeatures, distances, extract
from diffrep.eval.grid import interleave, save_grid
from diffrep.eval.ul import reconstruction
from diffrep.io import atomic_dir
from diffrep.models.artifact import FILE, load_model
from diffrep.stages import runner
from diffrep.train.rng import derive_seed

PREPARED = Path("data/prepared")
FEATNET = Path("models/feature_net")
UL1, UL2, SODA = Path("models/ul_stage1"), Path("models/ul_stage2"), Path("models/soda")
OUT = Path("results/generation_eval")


def subset(n_total: int, n: int, *keys) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(derive_seed(*keys)))[:n]


def dci_all(encoders: dict, prep: Prepared, cfg: Config, device) -> dict:
    """DCI of each encoder's codes and of PCA-of-pixels (eval.dci.pca_dim components) on the test split."""
    d = cfg.eval.dci
    train_x, test_x = prep.images_float("train"), prep.images_float("test")
    idx = subset(len(train_x), d.max_train, "dci", cfg.seed)
    f_tr, f_te = prep.array("train", "factors")[idx.numpy()], prep.array("test", "factors")
    names = prep.manifest.get("factor_names")
    codes = {name: (batched(fn, train_x[idx], device=device).flatten(1), batched(fn, test_x, device=device).flatten(1))
             for name, fn in encoders.items()}
    codes["pca"] = pca_features(train_x[idx].flatten(1), test_x.flatten(1), dim=d.pca_dim, seed=cfg.seed)
    return {name: dci(tr.numpy(), f_tr, te.numpy(), f_te, factor_names=names, method=d.method, bins=d.bins,
                      n_estimators=d.n_estimators, max_depth=d.max_depth, lasso_c=d.lasso_c, seed=cfg.seed)
            for name, (tr, te) in codes.items()}


def run(cfg: Config, root: Path) -> dict | None:
    from diffrep.sample import sample_ul

    with runner.stage("generation_eval", cfg, root) as ctx:
        if not ctx.is_main:
            return None
        e, dev, seconds = cfg.eval, ctx.runtime.device, {}
        prep = load_prepared(ctx.path(PREPARED))
        net = load_feature_net(ctx.path(FEATNET)).to(dev)
        inputs, missing, grids = [ctx.path(PREPARED), ctx.path(FEATNET)], [], []
        train_x, test_x = prep.images_float("train"), prep.images_float("test")
        test_y = torch.from_numpy(prep.labels("test"))
        n = min(e.n_samples, len(test_x), len(train_x))
        r = min(e.recon_images, n)
        test_idx = subset(len(test_x), n, "eval-test", cfg.seed)
        train_idx = subset(len(train_x), n, "eval-train", cfg.seed)
        real, other = test_x[test_idx], train_x[train_idx]
        kid = {"subsets": e.kid_subsets, "subset_size": e.kid_subset_size, "seed": cfg.seed}

        def featnet(x: torch.Tensor) -> torch.Tensor:
            return extract(net.features, x, batch_size=e.batch_size, device=dev)

        t = time.perf_counter()
        f_real = featnet(real)
        floor = distances(f_real, featnet(other), space="featnet", **kid)
        acc = (batched(net.predict, test_x, device=dev) == test_y).float().mean().item()
        m: dict = {"n": n, "recon_images": r, "featnet_test_accuracy": acc, "featnet_dim": net.num_features,
                   "fd_featnet_floor": floor["fd_featnet"], "kid_featnet_floor": floor["kid_featnet"],
                   "kid_featnet_floor_std": floor["kid_featnet_std"]}
        seconds["floor"] = time.perf_counter() - t

        have_ul = (ctx.path(UL1) / FILE).is_file() and (ctx.path(UL2) / FILE).is_file()
        samples = None
        if have_ul:
            inputs += [ctx.path(UL1), ctx.path(UL2)]
            t = time.perf_counter()
            samples = quantise(sample_ul(ctx.path(UL1), ctx.path(UL2), n, seed=cfg.seed, base_steps=e.base_steps,
                                         decoder_steps=e.decoder_steps, device=dev))
            seconds["ul_sample"] = time.perf_counter() - t
            m |= distances(f_real, featnet(samples), space="featnet", **kid)
            m["fd_featnet_ratio"] = m["fd_featnet"] / max(m["fd_featnet_floor"], 1e-12)
            t = time.perf_counter()
            stage1 = load_model(ctx.path(UL1), "ul_stage1").to(dev)
            g = torch.Generator().manual_seed(derive_seed("ul-recon", cfg.seed))
            _, recon = reconstruction(stage1, real[:r], generator=g, steps=e.decoder_steps, device=dev,
                                      batch_size=e.batch_size)
            # r < n images: the reconstruction FD gets its own real-vs-real floor at size r
            f_real_r = f_real[:r]
            rec = distances(f_real_r, featnet(recon), space="featnet", **kid)
            rec_floor = distances(f_real_r, featnet(other[:r]), space="featnet", **kid)
            m |= {"fd_featnet_ul_recon": rec["fd_featnet"], "kid_featnet_ul_recon": rec["kid_featnet"],
                  "fd_featnet_ul_recon_floor": rec_floor["fd_featnet"],
                  "fd_featnet_ul_recon_ratio": rec["fd_featnet"] / max(rec_floor["fd_featnet"], 1e-12)}
            seconds["ul_recon"] = time.perf_counter() - t
            grids += [("ul_samples.png", samples[: e.grid_images], 8),
                      ("ul_recon.png", interleave(real[:16], recon[:16]), 8)]
        else:
            missing.append("ul")
            print(f"[generation_eval] {UL1} or {UL2} not found: skipping UL sampling and reconstruction")

        soda = None  # SODA's reconstructions and novel views are the soda stage's (eval/soda.py); here: DCI
        if (ctx.path(SODA) / FILE).is_file():
            inputs.append(ctx.path(SODA))
            soda = load_model(ctx.path(SODA), "soda").to(dev)
        else:
            missing.append("soda")

        if e.inception_weights:
            t = time.perf_counter()
            inc = InceptionFeatures(e.inception_weights).to(dev)
            f_inc = extract(inc, real, batch_size=50, device=dev)
            fl = distances(f_inc, extract(inc, other, batch_size=50, device=dev), space="inception", **kid)
            m |= {"inception_fid_floor": fl["fd_inception"], "inception_kid_floor": fl["kid_inception"]}
            if samples is not None:
                s = distances(f_inc, extract(inc, samples, batch_size=50, device=dev), space="inception", **kid)
                m |= {"inception_fid": s["fd_inception"], "inception_kid": s["kid_inception"],
                      "inception_kid_std": s["kid_inception_std"]}
            seconds["inception"] = time.perf_counter() - t

        if prep.array("train", "factors") is not None:
            t = time.perf_counter()
            encoders = {}
            if soda is not None:
                encoders["soda"] = soda.encode
            if have_ul:
                encoders["ul"] = stage1.features
            m["dci"] = dci_all(encoders, prep, cfg, dev)
            for name, d in m["dci"].items():
                for key in ("disentanglement", "completeness", "informativeness"):
                    m[f"dci_{name}_{key}"] = d[key]
            seconds["dci"] = time.perf_counter() - t

        with atomic_dir(ctx.path(OUT)) as tmp:
            for fname, images, ncol in grids:
                save_grid(tmp / fname, images, ncol=ncol)
        m["missing"] = missing
        m["feature_space"] = (f"featnet = pooled penultimate layer ({net.num_features}-d) of the in-domain classifier "
                              "models/feature_net, not Inception")
        m["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        params = runner.section_params(cfg, "eval")
        return runner.finish(ctx, m, params=params, inputs=inputs, outputs=[ctx.path(OUT)])
