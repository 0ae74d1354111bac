"""`shapes_eval` stage (pipelines/shapes): SODA's 3D claims measured on the test objects, beside baselines.

  novel views    k = shapes_eval.source_views source views averaged in z, rendered at the last view's pose:
                 PSNR/SSIM (bootstrap intervals over objects, paired tests) and FD in the feature-net
                 space against the true views; baselines: copy the source view, the pose bin's mean image
  DCI            SODA z, UL latent, l-DAE features, PCA of pixels and random-init encoders against the
                 renderer's factors, intervals over test objects, SODA paired against each (eval/dci.py)
  control        edit specificity of each z sub-vector (eval/control.py), an edit grid, an interpolation strip
Writes results/shapes_eval/ (figures, scores.json), metrics/shapes_eval.json and reports/shapes.md (with the
`linear_probe` stage's table of the shape class, when metrics/linear_probe.json exists).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffrep.config import Config, to_dict
from diffrep.data.prepared import load_prepared
from diffrep.eval import nvs, shapes_report
from diffrep.eval.control import FactorReader, edit_specificity, swap_group
from diffrep.eval.dci import dci_intervals
from diffrep.eval.distances import distances
from diffrep.eval.feature_net import load_feature_net
from diffrep.eval.features import batched, pca_features, subset
from diffrep.eval.grid import interleave, save_grid
from diffrep.io import ArtifactError, atomic_dir, read_json, write_json
from diffrep.models import artifact
from diffrep.stages import runner
from diffrep.stages.report import section_probe
from diffrep.train.batches import ObjectViews, view_index

PREPARED, FEATNET, PROBE = Path("data/prepared"), Path("models/feature_net"), Path("metrics/linear_probe.json")
MODELS = {"soda": ("models/soda", "soda", "encode"), "ul": ("models/ul_stage1", "ul_stage1", "features"),
          "ldae": ("models/ldae", "ldae", "features")}
OUT, REPORT = Path("results/shapes_eval"), Path("reports")


def novel_views(soda, prep, cfg: Config, featnet, dev) -> tuple[dict, torch.Tensor, int]:
    """-> (scores, grid images, grid columns)."""
    s = cfg.shapes_eval
    test = {f: torch.from_numpy(prep.array("test", f)) for f in ("poses", "object_ids")}
    index = view_index(test["object_ids"])[: s.max_objects]  # (n, V): the first max_objects test objects
    views, poses = ObjectViews(prep.image_rows("test"), index)[:], test["poses"][index]  # only their views are read
    tr_poses = torch.from_numpy(prep.array("train", "poses"))
    means = nvs.pose_bin_means(prep.image_rows("train"), tr_poses, s.pose_bins)  # streamed over the train rows
    target = views[:, -1]
    preds = {f"soda_k{k}": x for k, x in nvs.synthesise(soda, views, poses, s.source_views, seed=cfg.seed).items()}
    preds |= {"copy_source": views[:, 0], "pose_mean": means[nvs.pose_bins(poses[:, -1], *s.pose_bins)]}
    k1 = f"soda_k{s.source_views[0]}"
    pairs = [(k1, "copy_source"), (k1, "pose_mean")] + [(f"soda_k{k}", k1) for k in s.source_views[1:]]
    out = nvs.score_table(preds, target, resamples=s.bootstrap, seed=cfg.seed, against=pairs)
    feats = lambda x: batched(featnet.features, x, device=dev).float()
    fd = distances(feats(target), {n: [feats(x)] for n, x in preds.items()}, resamples=cfg.eval.bootstrap,
                   seed=cfg.seed, pairs=pairs)
    for name in preds:
        out["methods"][name] |= {"fd": fd[name]["fd"], "fd_ci95": fd[name]["fd_ci95"]}
    out["paired"] += [r | {"metric": "fd"} for r in fd["paired"] if r["metric"] == "fd"]
    show = torch.arange(min(8, len(views)))
    cols = [views[show, i] for i in range(max(s.source_views))] + [preds[f"soda_k{k}"][show] for k in s.source_views]
    grid = interleave(*cols, target[show], preds["copy_source"][show], preds["pose_mean"][show])
    return out, grid, len(cols) + 3


def encoders(ctx, cfg: Config) -> tuple[dict, list[Path]]:
    """{name: feature fn} for every trained model present and its random-init twin."""
    fns, used = {}, []
    for name, (folder, kind, method) in MODELS.items():
        if not ctx.path(folder).is_dir():
            continue
        used.append(ctx.path(folder))
        for suffix, seed in (("", None), ("_random_init", cfg.seed)):
            net = artifact.load_model(ctx.path(folder), kind, init_seed=seed).requires_grad_(False).to(ctx.runtime.device)
            fns[name + suffix] = (lambda f: lambda x: batched(f, x, device=ctx.runtime.device).flatten(1))(getattr(net, method))
    return fns, used


def dci_all(fns: dict, prep, cfg: Config) -> dict:
    d = cfg.eval.dci
    train_x, test_x = prep.image_rows("train"), prep.image_rows("test")  # memory-mapped, read in batches
    idx = subset(len(train_x), d.max_train, "dci", cfg.seed)
    codes = {n: (f(train_x[idx]).numpy(), f(test_x).numpy()) for n, f in fns.items()}
    codes["pca"] = tuple(c.numpy() for c in pca_features(train_x[idx], test_x, dim=d.pca_dim, seed=cfg.seed))
    return dci_intervals(codes, prep.array("train", "factors")[idx.numpy()], prep.array("test", "factors"),
                         prep.array("test", "object_ids"), bins=d.bins, n_estimators=d.n_estimators,
                         max_depth=d.max_depth, resamples=cfg.shapes_eval.bootstrap, seed=cfg.seed,
                         against="soda" if "soda" in codes else None, factor_names=prep.manifest.get("factor_names"))


def control(soda, prep, cfg: Config) -> tuple[dict, torch.Tensor, torch.Tensor]:
    s, names = cfg.shapes_eval, prep.manifest["factor_names"]
    reader = FactorReader(prep.image_rows("train"), prep.array("train", "factors"), bins=cfg.eval.dci.bins,
                          pca_dim=s.reader_pca_dim, seed=cfg.seed, fit_rows=s.reader_pca_rows)
    test_x, test_f = prep.image_rows("test"), prep.array("test", "factors")  # memory-mapped: read in batches
    acc = (reader.predict(test_x) == reader.classes(test_f)).mean(0)
    n = min(s.edit_pairs, len(test_x))
    pick = torch.arange(n) * (len(test_x) // n)  # spread over objects (views are object-major)
    poses = torch.from_numpy(prep.array("test", "poses"))
    spec = edit_specificity(soda, test_x[pick], poses[pick], reader, names, seed=cfg.seed)
    spec["reader_test_accuracy"] = dict(zip(names, acc.round(4).tolist()))
    show = pick[:4]
    a, b, pa = test_x[show], test_x[show.roll(-1)], poses[show]  # each object edited towards the next one
    za, zb = soda.encode(a), soda.encode(b)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(cfg.seed))
    sizes = soda.decoder.z_sizes
    cols = [a, b, soda.decode(za, pa, noise=noise)] + [soda.decode(swap_group(za, zb, sizes, g), pa, noise=noise)
                                                       for g in range(len(sizes))]
    strip = soda.interpolate(a[0], b[0], s.interp_steps, seed=cfg.seed, pose=pa[:1].expand(s.interp_steps, -1))
    return spec, interleave(*cols), strip


def run(cfg: Config, root: Path) -> dict | None:
    with runner.stage("shapes_eval", cfg, root) as ctx:
        if not ctx.is_main:
            return None
        prep = load_prepared(ctx.path(PREPARED))
        if prep.array("train", "poses") is None or prep.manifest.get("factor_names") is None:
            raise ArtifactError(f"{ctx.path(PREPARED)}: shapes_eval needs 3D data with poses and factors "
                                         "(data.source: shapes; run it through pipelines/shapes)")
        prep.release_test()  # nothing is chosen here: every choice (the sample grid) was made on val
        dev = ctx.runtime.device
        fns, used = encoders(ctx, cfg)
        soda = artifact.load_model(ctx.path("models/soda"), "soda").requires_grad_(False).to(dev)
        featnet = load_feature_net(ctx.path(FEATNET)).to(dev)
        scores = {"novel_views": None, "dci": None, "control": None}
        scores["novel_views"], nvs_grid, nvs_cols = novel_views(soda, prep, cfg, featnet, dev)
        scores["dci"] = dci_all(fns, prep, cfg)
        scores["control"], edit_grid, strip = control(soda, prep, cfg)
        with atomic_dir(ctx.path(OUT)) as tmp:
            save_grid(tmp / "nvs.png", nvs_grid, ncol=nvs_cols, upscale=3)
            save_grid(tmp / "edit.png", edit_grid, ncol=3 + len(soda.decoder.z_sizes), upscale=3)
            save_grid(tmp / "interpolation.png", strip, ncol=len(strip), upscale=3)
            shapes_report.importance_figure(tmp / "dci_importance.png", scores["dci"], soda.decoder.z_sizes)
            write_json(tmp / "scores.json", scores)
        probe = ctx.path(PROBE)  # the linear_probe stage's table (shape class) goes into the same report
        probe_md = section_probe({"linear_probe": read_json(probe)}) if probe.is_file() else []
        with atomic_dir(ctx.path(REPORT)) as tmp:
            shapes_report.write(tmp, ctx.path(OUT), scores, cfg, probe=probe_md)
        params = {"seed": cfg.seed, "shapes_eval": to_dict(cfg.shapes_eval), "eval": to_dict(cfg.eval)}
        return runner.finish(ctx, shapes_report.headline(scores, cfg), params=params,
                             inputs=[ctx.path(PREPARED), ctx.path(FEATNET), *used],
                             outputs=[ctx.path(OUT), ctx.path(REPORT)])
