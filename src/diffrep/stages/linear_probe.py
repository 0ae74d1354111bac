"""`linear_probe` stage: every representation through the one probe protocol, beside its baselines.

Representations (all on the same prepared split, all computed in this run):
  soda, ul, ldae        the trained encoders: SODA z (`encode`), UL flattened clean
                        latent (`features`), l-DAE pooled encoder tokens (`features`)
  *_random_init         the same architecture rebuilt from the saved config with
                        fresh weights (a new init per probe seed), keeping only the
                        artifact's buffers (fixed, untrained state such as l-DAE's
                        fitted patch-PCA tokenizer): what the architecture gives for free
  raw_pixels, pca       the flattened images (read from the memory-mapped rows batch by batch), and
                        their top `probe.pca_dim` principal components (sklearn PCA fitted on the
                        training split, at most `probe.pca_rows` rows of it)
Protocol (eval/probe.py): kNN k and probe lr chosen on val per representation;
then the test split is released and read once: kNN (Wilson 95% interval) and the
probe trained once per seed, per-image correctness averaged (bootstrap 95% interval).
Paired tests on the same test images (eval/paired.py): each trained representation
against the best baseline (chosen on val) and against each other method; for l-DAE,
the kNN under three normalisations (eval/knn_study.py). A missing model is skipped
and listed in `missing`.

Writes metrics/linear_probe.json (flat headline keys `probe_<rep>`, `knn_<rep>` for
`dvc exp show`; per-representation detail under `representations`; `comparisons`;
lineage), metrics/linear_probe_bars.csv (`dvc plots`), results/linear_probe/probe_bars.png and
results/linear_probe/scores_<rep>_<linear|knn>.npy (each test image's score, in test order: two runs
on the same split can be compared image by image with eval/paired.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from diffrep.config import Config
from diffrep.data.prepared import load_prepared
from diffrep.eval.features import batched, feature_fn, fit_pca, pixels, subset
from diffrep.eval.knn_study import knn_by_normalization
from diffrep.eval.plots import bar_chart
from diffrep.eval.probe import Probe, comparisons
from diffrep.io import atomic_dir, save_npy, write_text
from diffrep.models import artifact
from diffrep.nn import set_attention_backend
from diffrep.stages import runner
from diffrep.train.rng import derive_seed

PREPARED = Path("data/prepared")
BARS = Path("metrics/linear_probe_bars.csv")
OUT = Path("results/linear_probe")
# representation -> (model folder, artifact kind); each kind's features: eval/features.py FEATURE_METHODS
ENCODERS = {
    "soda": ("models/soda", "soda"),
    "ul": ("models/ul_stage1", "ul_stage1"),
    "ldae": ("models/ldae", "ldae"),
}
SPLITS = ("train", "val", "test")


def build_encoder(folder: Path, kind: str, init_seed: int | None = None) -> torch.nn.Module:
    """The trained model of an artifact folder, or (init_seed given) a fresh init of the same architecture."""
    return artifact.load_model(folder, kind, init_seed=init_seed).requires_grad_(False)


def representations(ctx, cfg: Config, x_train: torch.Tensor) -> tuple[dict, dict, list, list]:
    """-> ({name: [feature fn per seed, or one]}, {name: group}, missing names, model folders read)."""
    dev, p = ctx.runtime.device, cfg.probe
    fns: dict[str, list[Callable]] = {}
    groups, missing, inputs = {}, [], []

    def features(net: torch.nn.Module, kind: str) -> Callable:
        set_attention_backend(net, ctx.runtime.attention)
        return feature_fn(net.to(dev), kind, device=dev)

    for name, (folder, kind) in ENCODERS.items():
        path = ctx.path(folder)
        if not (path / artifact.FILE).is_file():
            missing.append(name)
            print(f"[linear_probe] {folder} not found: skipping {name} (run its stage to include it)")
            continue
        inputs.append(path)
        fns[name], groups[name] = [features(build_encoder(path, kind), kind)], "diffusion"
        if p.random_init:
            fns[f"{name}_random_init"] = [
                features(build_encoder(path, kind, derive_seed("random-init", cfg.seed, name, s)), kind)
                for s in p.seeds]
            groups[f"{name}_random_init"] = "baseline"
    # the pixel baselines: raw pixels are read from the rows when used (RowFeatures); PCA is fitted on at most
    # probe.pca_rows train rows (all, in order, when the split has no more) and projects in batches
    n = len(x_train)
    pca = fit_pca(x_train[:] if n <= p.pca_rows else x_train[subset(n, p.pca_rows, "probe-pca", cfg.seed).sort().values],
                  dim=p.pca_dim, seed=cfg.seed)
    fns["raw_pixels"], fns["pca"] = [pixels], [lambda x: batched(lambda b: pca(b.flatten(1)), x)]
    groups |= {"raw_pixels": "baseline", "pca": "baseline"}
    return fns, groups, missing, inputs


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("linear_probe", cfg, root) as ctx:
        if not ctx.is_main:
            return None
        prep = load_prepared(ctx.path(PREPARED))
        x = {s: prep.image_rows(s) for s in ("train", "val")}  # memory-mapped; encoders read them in batches
        fns, groups, missing, models = representations(ctx, cfg, x["train"])
        probe = Probe(cfg.probe, torch.from_numpy(prep.labels("train")), prep.num_classes, cfg.seed)
        feats = {name: [{s: f(x[s]) for s in x} for f in fs] for name, fs in fns.items()}  # [seed] -> split -> (N, D)

        # 1. choose on val (the first seed's features), and pick the best baseline on val too
        val_y = torch.from_numpy(prep.labels("val"))
        choices = {name: probe.choose((f[0]["train"], f[0]["val"]), val_y) for name, f in feats.items()}
        baselines = [n for n in feats if groups[n] == "baseline"]
        best = {clf: max(baselines, key=lambda n: choices[n][f"val_{clf}"]) for clf in ("linear", "knn")}

        # 2. release the test split and read it once
        prep.release_test()
        x["test"], test_y = prep.image_rows("test"), torch.from_numpy(prep.labels("test"))
        reps, scores = {}, {}
        for name, fs in fns.items():
            pairs = [(feats[name][i]["train"], f(x["test"])) for i, f in enumerate(fs)]
            reps[name], scores[name] = probe.report(pairs, test_y, choices[name])
            reps[name]["group"] = groups[name]
            feats[name][0]["test"] = pairs[0][1]
        trained = [n for n in feats if groups[n] == "diffusion"]
        methods = [(a, b) for i, a in enumerate(trained) for b in trained[i + 1:]]  # each method against the others
        table = [row for clf in ("linear", "knn")
                 for row in comparisons(probe, scores, [(n, best[clf]) for n in trained] + methods, clf)]
        metrics = {f"{key}_{name}": reps[name][clf]["acc"] for name in reps
                   for key, clf in (("probe", "linear"), ("knn", "knn"))}
        metrics |= {"best_baseline": best, "representations": reps, "comparisons": table, "missing": missing}
        if "ldae" in feats and "ldae_random_init" in feats:  # the kNN verdict under three normalisations
            k = choices["ldae"]["knn_k"]
            metrics["knn_by_normalization"] = {"k": k} | knn_by_normalization(
                lambda tr, te: probe.knn((tr, te), test_y, k),
                *((feats[n][0]["train"], feats[n][0]["test"]) for n in ("ldae", "raw_pixels", "ldae_random_init")))
        metrics["settings"] = {"seeds": list(cfg.probe.seeds), "num_classes": prep.num_classes,
                               "chance": 1.0 / prep.num_classes, **{f"{s}_images": len(x[s]) for s in SPLITS}}

        rows = sorted(((n, r["linear"]["acc"], *r["linear"]["ci95"], r["group"]) for n, r in reps.items()),
                      key=lambda t: -t[1])
        write_text(ctx.path(BARS), "representation,accuracy,ci_low,ci_high,group\n"
                   + "".join(f"{n},{a:.4f},{lo:.4f},{hi:.4f},{g}\n" for n, a, lo, hi, g in rows))
        with atomic_dir(ctx.path(OUT)) as tmp:
            # per-test-image scores, so two runs (experiments) can be compared by a paired test (eval/paired.py)
            for name, sc in scores.items():
                for clf, v in sc.items():
                    save_npy(tmp / f"scores_{name}_{clf}.npy", v.float().numpy())
            bar_chart(tmp / "probe_bars.png", rows,
                      f"{prep.manifest['source']} {'x'.join(map(str, prep.image_shape))}: linear probe on test, "
                      f"mean over {len(cfg.probe.seeds)} seeds, 95% interval")
        params = runner.section_params(cfg, "probe")
        return runner.finish(ctx, metrics, params=params, inputs=[ctx.path(PREPARED), *models],
                             outputs=[ctx.path(BARS), ctx.path(OUT)])
