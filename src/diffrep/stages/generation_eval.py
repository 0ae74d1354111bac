"""`generation_eval` stage: UL sample and reconstruction quality against stored reference statistics.

Feature space: the in-domain classifier (models/feature_net; keys `*_featnet`); the
reference: its features of the real test split, stored by the `fid_reference` stage
(data/fid_reference/, hashed in the lineage). Every set is compared with that reference:
  samples           UL stage-2 samples (8-bit quantised like the data), `eval.n_samples` per seed
                    in `eval.sample_seeds`; FD and KID are means over the seeds
  floor_val         real val images (as many as one seed's samples, at most all of val): the honest
                    real-vs-real floor, two disjoint sets the feature net never trained on
  floor_train       as many real train images: the older train-vs-test floor, kept beside it, labelled
                    (the feature net trained on these images)
  fd_featnet_ratio  samples / floor_val, with a paired-bootstrap interval
UL reconstructions of `eval.recon_images` test images get an FD against those images, beside
the same number of val images against them (their floor). Every FD and KID carries a 95%
percentile-bootstrap interval and each comparison a paired bootstrap test (eval/distances.py).
With factors (shapes): DCI of SODA z and UL latents, beside PCA of the pixels.

Writes results/generation_eval/ (sample and reconstruction grids; the samples' feature-net
features, featnet_samples_seed<S>.npy, to compare experiments with eval/distances.py) and
metrics/generation_eval.json (flat headline keys, details, lineage).
A missing SODA or UL model is skipped and listed in `missing`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffrep.config import Config
from diffrep.data.prepared import Prepared, load_prepared
from diffrep.eval.dci import dci
from diffrep.eval.distances import distances
from diffrep.eval.feature_net import load_feature_net
from diffrep.eval.features import batched, pca_features, quantise, subset
from diffrep.eval.fid import InceptionFeatures
from diffrep.eval.grid import interleave, save_grid
from diffrep.eval.reference import load_reference, save_features
from diffrep.eval.ul import reconstruction
from diffrep.io import atomic_dir
from diffrep.models.artifact import FILE, load_model
from diffrep.stages import runner
from diffrep.train.rng import derive_seed

PREPARED, FEATNET, REFERENCE = Path("data/prepared"), Path("models/feature_net"), Path("data/fid_reference")
UL1, UL2, SODA = Path("models/ul_stage1"), Path("models/ul_stage2"), Path("models/soda")
OUT = Path("results/generation_eval")


def headline(d: dict, space: str) -> dict:
    """Flat keys for `dvc exp show`: FD and KID of the samples, the floors, the ratio, with interval ends."""
    m = {}
    for name, key in (("samples", ""), ("floor_val", "_floor"), ("floor_train", "_floor_train")):
        if name in d:
            for metric in ("fd", "kid"):
                m[f"{metric}_{space}{key}"] = d[name][metric]
                m[f"{metric}_{space}{key}_ci95"] = d[name][f"{metric}_ci95"]
    for row in d["paired"]:
        if row["metric"] == "fd" and row["a"] == "samples" and row["b"] == "floor_val":
            m[f"fd_{space}_ratio"], m[f"fd_{space}_ratio_ci95"] = row["ratio"], row["ratio_ci95"]
            # how far the samples are above real images, with the paired test's interval and p
            m[f"fd_{space}_above_floor"], m[f"fd_{space}_above_floor_ci95"] = row["diff"], row["diff_ci95"]
            m[f"fd_{space}_above_floor_p"] = row["p_value"]
    return m


def dci_all(encoders: dict, prep: Prepared, cfg: Config, device) -> dict:
    """DCI of each encoder's codes and of PCA-of-pixels (eval.dci.pca_dim components) on the test split."""
    d = cfg.eval.dci
    train_x, test_x = prep.image_rows("train"), prep.image_rows("test")  # memory-mapped, read in batches
    idx = subset(len(train_x), d.max_train, "dci", cfg.seed)
    f_tr, f_te = prep.array("train", "factors")[idx.numpy()], prep.array("test", "factors")
    names = prep.manifest.get("factor_names")
    codes = {name: (batched(fn, train_x[idx], device=device).flatten(1), batched(fn, test_x, device=device).flatten(1))
             for name, fn in encoders.items()}
    codes["pca"] = pca_features(train_x[idx], test_x, dim=d.pca_dim, seed=cfg.seed)  # test: projected in batches
    return {name: dci(tr.numpy(), f_tr, te.numpy(), f_te, factor_names=names, method=d.method, bins=d.bins,
                      n_estimators=d.n_estimators, max_depth=d.max_depth, lasso_c=d.lasso_c, seed=cfg.seed)
            for name, (tr, te) in codes.items()}


def dci_metrics(dci_by_code: dict) -> dict:
    """The DCI table and its flat keys (`dci_<code>_<score>`) for `dvc exp show`."""
    return {"dci": dci_by_code} | {f"dci_{name}_{key}": d[key] for name, d in dci_by_code.items()
                                   for key in ("disentanglement", "completeness", "informativeness")}


@dataclass
class Eval:
    """What every part of the stage shares: the feature net, the bootstrap settings, the timings."""

    cfg: Config
    device: torch.device
    net: torch.nn.Module
    seconds: dict = field(default_factory=dict)

    @property
    def boot(self) -> dict:
        return {"resamples": self.cfg.eval.bootstrap, "seed": self.cfg.seed}

    def featnet(self, x: torch.Tensor) -> torch.Tensor:
        return batched(self.net.features, x, batch_size=self.cfg.eval.batch_size, device=self.device).float()

    @contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 1)


def real_sets(ev: Eval, prep: Prepared) -> dict[str, torch.Tensor]:
    """The floors' images: as many real val (never seen by the feature net) and train images as one seed's samples."""
    val_x, train_x = prep.image_rows("val"), prep.image_rows("train")  # only the subsets are read
    n = min(ev.cfg.eval.n_samples, len(val_x), len(train_x))
    return {"floor_val": val_x[subset(len(val_x), n, "eval-val", ev.cfg.seed)],
            "floor_train": train_x[subset(len(train_x), n, "eval-train", ev.cfg.seed)]}


def ul_samples(ev: Eval, stage1: Path, stage2: Path) -> list[torch.Tensor]:
    """`eval.n_samples` UL samples for each of `eval.sample_seeds`, quantised to the data's 256 levels."""
    from diffrep.sample import sample_ul

    e = ev.cfg.eval
    with ev.timed("ul_sample"):
        return [quantise(sample_ul(stage1, stage2, e.n_samples, device=ev.device, base_steps=e.base_steps,
                                   seed=derive_seed("eval-samples", ev.cfg.seed, s), decoder_steps=e.decoder_steps))
                for s in e.sample_seeds]


def ul_reconstructions(ev: Eval, stage1, test_x: torch.Tensor, floor_val: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """FD/KID of UL reconstructions of `eval.recon_images` test images against those images, beside val images."""
    e = ev.cfg.eval
    with ev.timed("ul_recon"):
        r = min(e.recon_images, len(test_x), len(floor_val))
        targets = test_x[subset(len(test_x), r, "eval-test", ev.cfg.seed)]
        g = torch.Generator().manual_seed(derive_seed("ul-recon", ev.cfg.seed))
        _, recon = reconstruction(stage1, targets, generator=g, steps=e.decoder_steps, device=ev.device,
                                  batch_size=e.batch_size)
        rec = distances(ev.featnet(targets), {"recon": [ev.featnet(recon)], "floor_val": [ev.featnet(floor_val[:r])]},
                        pairs=[("recon", "floor_val")], **ev.boot)
    m = {"ul_recon_featnet": rec | {"n": r}, "fd_featnet_ul_recon": rec["recon"]["fd"],
         "fd_featnet_ul_recon_ci95": rec["recon"]["fd_ci95"], "fd_featnet_ul_recon_floor": rec["floor_val"]["fd"],
         "fd_featnet_ul_recon_ratio": rec["paired"][0]["ratio"]}
    return m, interleave(targets[:16], recon[:16])


def inception_distances(ev: Eval, real: dict, samples: list, test_x: torch.Tensor, pairs: list) -> dict:
    """The standard FID space (user-supplied weights): reference = the same test images, features made here."""
    with ev.timed("inception"):
        inc = InceptionFeatures(ev.cfg.eval.inception_weights).to(ev.device)

        def inception(x: torch.Tensor) -> torch.Tensor:
            return batched(inc, x, batch_size=50, device=ev.device).float()

        sets = {name: [inception(x)] for name, x in real.items()} | (
            {"samples": [inception(x) for x in samples]} if samples else {})
        d = distances(inception(test_x), sets, pairs=pairs, **ev.boot)
    return {"inception": d} | headline(d, "inception")


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("generation_eval", cfg, root) as ctx:
        if not ctx.is_main:
            return None
        dev = ctx.runtime.device
        prep = load_prepared(ctx.path(PREPARED))
        ev = Eval(cfg, dev, load_feature_net(ctx.path(FEATNET)).to(dev))
        ref, ref_manifest = load_reference(ctx.path(REFERENCE))
        inputs, missing, grids = [ctx.path(PREPARED), ctx.path(FEATNET), ctx.path(REFERENCE)], [], []
        real = real_sets(ev, prep)
        sets = {name: [ev.featnet(x)] for name, x in real.items()}
        m: dict = {"reference": ref_manifest | {"path": str(REFERENCE)}, "n_floor": len(real["floor_val"]),
                   "feature_space": f"featnet = pooled penultimate layer ({ev.net.num_features}-d) of the in-domain "
                                    "classifier models/feature_net, not Inception"}
        have_ul = (ctx.path(UL1) / FILE).is_file() and (ctx.path(UL2) / FILE).is_file()
        samples = ul_samples(ev, ctx.path(UL1), ctx.path(UL2)) if have_ul else []
        if have_ul:
            inputs += [ctx.path(UL1), ctx.path(UL2)]
            sets["samples"] = [ev.featnet(x) for x in samples]
            grids.append(("ul_samples.png", samples[0][: cfg.eval.grid_images], 8))
        else:
            missing.append("ul")
            print(f"[generation_eval] {UL1} or {UL2} not found: skipping UL sampling and reconstruction")
        pairs = [("samples", "floor_val"), ("floor_train", "floor_val")] if have_ul else [("floor_train", "floor_val")]
        with ev.timed("distances"):
            m["featnet"] = distances(ref, sets, pairs=pairs, **ev.boot)
        m |= headline(m["featnet"], "featnet")

        prep.release_test()  # nothing is chosen in this stage; test images are the reconstruction targets
        test_x = prep.image_rows("test")  # memory-mapped: every use reads batches or a subset
        stage1 = load_model(ctx.path(UL1), "ul_stage1").to(dev) if have_ul else None
        if stage1 is not None:
            rec, grid = ul_reconstructions(ev, stage1, test_x, real["floor_val"])
            m |= rec
            grids.append(("ul_recon.png", grid, 8))
        if cfg.eval.inception_weights:
            m |= inception_distances(ev, real, samples, test_x, pairs)
        if prep.array("train", "factors") is not None:
            encoders = {"ul": stage1.features} if stage1 is not None else {}
            if (ctx.path(SODA) / FILE).is_file():
                inputs.append(ctx.path(SODA))
                encoders["soda"] = load_model(ctx.path(SODA), "soda").to(dev).encode
            with ev.timed("dci"):
                m |= dci_metrics(dci_all(encoders, prep, cfg, dev))

        with atomic_dir(ctx.path(OUT)) as tmp:
            for fname, images, ncol in grids:
                save_grid(tmp / fname, images, ncol=ncol)
            if have_ul:  # so two runs' samples can be compared by a paired bootstrap against the same reference
                save_features(tmp, {f"featnet_samples_seed{s}": f for s, f in zip(cfg.eval.sample_seeds, sets["samples"])})
        m["missing"] = missing
        m["featnet_test_accuracy"] = (batched(ev.net.predict, test_x, device=dev)
                                      == torch.from_numpy(prep.labels("test"))).double().mean().item()
        m["seconds"] = ev.seconds
        return runner.finish(ctx, m, params=runner.section_params(cfg, "eval"), inputs=inputs, outputs=[ctx.path(OUT)])
