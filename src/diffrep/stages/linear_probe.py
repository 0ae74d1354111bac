"""`linear_probe` stage: how linearly useful is each frozen representation, beside its baselines?

Representations (all on the same prepared split, all computed in this run):
  soda, ul, ldae        the trained encoders: SODA z (`encode`), UL flattened clean
                        latent (`features`), l-DAE pooled encoder tokens (`features`)
  *_random_init         the same architecture rebuilt from the saved config with
                        fresh weights (a new init per probe seed), keeping only the
                        artifact's buffers (fixed, untrained state such as l-DAE's
                        fitted patch-PCA tokenizer): what the architecture gives for free
  raw_pixels, pca       the flattened images, and their top `probe.pca_dim` principal
                        components (sklearn PCA fitted on the training split)
Each gets the MAE linear probe (BatchNorm without affine + linear, eval/probe.py)
once per seed in `probe.seeds` -> mean and std (ddof=1) of test top-1, and the
weighted kNN. A model whose folder is missing is skipped and listed in `missing`.

Writes metrics/linear_probe.json (flat headline keys `probe_<rep>`, `knn_<rep>` for
`dvc exp show`; per-representation detail under `representations`; lineage),
metrics/linear_probe_bars.csv (representation,accuracy,std,group: `dvc plots`,
bar_horizontal) and results/linear_probe/probe_bars.png.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from diffrep.config import Config
from diffrep.data.prepared import load_prepared
from diffrep.eval.features import batched, pca_features
from diffrep.eval.probe import ProbeConfig, knn_accuracy, linear_probe
from diffrep.io import atomic_dir, write_text
from diffrep.models import artifact
from diffrep.nn import set_attention_backend
from diffrep.stages import runner
from diffrep.train.rng import derive_seed

PREPARED = Path("data/prepared")
BARS = Path("metrics/linear_probe_bars.csv")
OUT = Path("results/linear_probe")
# representation -> (model folder, artifact kind, feature method)
ENCODERS = {
    "soda": ("models/soda", "soda", "encode"),
    "ul": ("models/ul_stage1", "ul_stage1", "features"),
    "ldae": ("models/ldae", "ldae", "features"),
}


def build_encoder(folder: Path, kind: str, init_seed: int | None = None) -> nn.Module:
    """The trained model of an artifact folder, or (init_seed given) a fresh init of the same architecture."""
    return artifact.load_model(folder, kind, init_seed=init_seed).requires_grad_(False)


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "runs": [float(x) for x in v]}


def probe_all(feature_sets: list[tuple[torch.Tensor, torch.Tensor]], train_y, test_y, k: int, cfg: Config) -> dict:
    """feature_sets: one (train, test) pair per probe seed (the same pair repeated for fixed features)."""
    p = cfg.probe
    pc = ProbeConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay)
    linear, knn, seen = [], [], {}
    for s, (tr, te) in zip(p.seeds, feature_sets):
        linear.append(linear_probe(tr, train_y, te, test_y, k, pc, seed=derive_seed("probe", cfg.seed, s)))
        if id(tr) not in seen:  # kNN has no seed: once per distinct feature set
            seen[id(tr)] = knn_accuracy(tr, train_y, te, test_y, k, k=p.knn_k, temperature=p.knn_temperature)
        knn.append(seen[id(tr)])
    return {"linear": _stats(linear), "knn": _stats(knn) if len(seen) > 1 else {"mean": knn[0], "std": 0.0},
            "dim": int(feature_sets[0][0].shape[1])}


def bar_chart(path: Path, rows: list[tuple[str, float, float, str]], title: str) -> None:
    """Horizontal bars with std error bars; trained encoders and baselines in two colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    names = [r[0] for r in rows][::-1]
    acc = [100 * r[1] for r in rows][::-1]
    err = [100 * r[2] for r in rows][::-1]
    colours = ["tab:blue" if r[3] == "diffusion" else "tab:gray" for r in rows][::-1]
    ax.barh(names, acc, xerr=err, color=colours, capsize=3)
    for y, (a, e) in enumerate(zip(acc, err)):
        ax.text(a + e + 0.4, y, f"{a:.1f}", va="center", fontsize=8)
    lo = max(0.0, min(acc) - 10)
    ax.set_xlim(lo, 100)
    ax.set_xlabel("linear-probe test top-1 (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("linear_probe", cfg, root) as ctx:
        if not ctx.is_main:
            return None
        dev, p = ctx.runtime.device, cfg.probe
        prep = load_prepared(ctx.path(PREPARED))
        train_x, test_x = prep.images_float("train"), prep.images_float("test")
        train_y, test_y = torch.from_numpy(prep.labels("train")), torch.from_numpy(prep.labels("test"))
        k, n_seeds = prep.num_classes, len(p.seeds)
        inputs, missing = [ctx.path(PREPARED)], []
        reps: dict[str, dict] = {}
        groups: dict[str, str] = {}

        def feats(net: nn.Module, method: str) -> tuple[torch.Tensor, torch.Tensor]:
            set_attention_backend(net, ctx.runtime.attention)
            fn = getattr(net.to(dev), method)
            return batched(fn, train_x, device=dev).flatten(1), batched(fn, test_x, device=dev).flatten(1)

        for name, (folder, kind, method) in ENCODERS.items():
            path = ctx.path(folder)
            if not (path / artifact.FILE).is_file():
                missing.append(name)
                print(f"[linear_probe] {folder} not found: skipping {name} (run its stage to include it)")
                continue
            inputs.append(path)
            fixed = feats(build_encoder(path, kind), method)
            reps[name], groups[name] = probe_all([fixed] * n_seeds, train_y, test_y, k, cfg), "diffusion"
            if p.random_init:
                fresh = [feats(build_encoder(path, kind, derive_seed("random-init", cfg.seed, name, s)), method)
                         for s in p.seeds]
                reps[f"{name}_random_init"] = probe_all(fresh, train_y, test_y, k, cfg)
                groups[f"{name}_random_init"] = "baseline"
        raw = (train_x.flatten(1), test_x.flatten(1))
        reps["raw_pixels"], groups["raw_pixels"] = probe_all([raw] * n_seeds, train_y, test_y, k, cfg), "baseline"
        pca = pca_features(*raw, dim=p.pca_dim, seed=cfg.seed)
        reps["pca"], groups["pca"] = probe_all([pca] * n_seeds, train_y, test_y, k, cfg), "baseline"
        for name, r in reps.items():
            r["group"] = groups[name]

        headline: dict[str, float | str | None] = {}
        for name, r in reps.items():
            headline[f"probe_{name}"] = r["linear"]["mean"]
            headline[f"probe_{name}_std"] = r["linear"]["std"]
            headline[f"knn_{name}"] = r["knn"]["mean"]
        trained = {n: r["linear"]["mean"] for n, r in reps.items() if r["group"] == "diffusion"}
        baseline = {n: r["linear"]["mean"] for n, r in reps.items() if r["group"] == "baseline"}
        best = max(trained, key=trained.get) if trained else None
        best_base = max(baseline, key=baseline.get)
        headline |= {
            "best_representation": best,
            "best_probe": trained[best] if best else None,
            "best_baseline": best_base,
            "best_baseline_probe": baseline[best_base],
            "margin_over_baselines": trained[best] - baseline[best_base] if best else None,
        }

        rows = sorted(((n, r["linear"]["mean"], r["linear"]["std"], r["group"]) for n, r in reps.items()),
                      key=lambda t: -t[1])
        write_text(ctx.path(BARS), "representation,accuracy,std,group\n"
                   + "".join(f"{n},{a:.4f},{s:.4f},{g}\n" for n, a, s, g in rows))
        with atomic_dir(ctx.path(OUT)) as tmp:
            bar_chart(tmp / "probe_bars.png", rows,
                      f"{prep.manifest['source']} {'x'.join(map(str, prep.image_shape))}: linear probe, "
                      f"mean ± std over {n_seeds} seeds")
        metrics = {
            **headline,
            "representations": reps,
            "missing": missing,
            "settings": {"seeds": list(p.seeds), "train_images": len(train_x), "test_images": len(test_x),
                         "num_classes": k, "chance": 1.0 / k},
        }
        params = runner.section_params(cfg, "probe")
        return runner.finish(ctx, metrics, params=params, inputs=inputs,
                             outputs=[ctx.path(BARS), ctx.path(OUT)])
