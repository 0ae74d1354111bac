"""`report` stage: one markdown page with every metric beside its baselines and floors.

Reads metrics/<stage>.json of every stage (a missing one is named, not an
error: a partial pipeline still gets a report) and the image grids the stages
wrote; writes reports/report.md and reports/figures/*.png (copies, linked
relatively, so the folder is self-contained). Sections: data, linear probe
(with raw-pixel, PCA and random-init baselines), generation (Fréchet distance
and KID in the feature-net space with the real-vs-real floor; Inception FID
only when measured), reconstruction and bits/px, novel views and DCI when the
data has them, training runs, the resolved params and the lineage summary
(stage -> git commit, input hashes) of every metrics file.

Under the Prefect pipeline flow, `publish_prefect_artifact(md)` publishes the
page as a markdown artifact (see its docstring for when it runs).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from diffrep.config import Config, to_dict
from diffrep.io import ArtifactError, atomic_dir, read_json

OUT = Path("reports")
STAGES = ("prepare", "feature_net", "soda", "ul_stage1", "ul_stage2", "ldae", "linear_probe", "generation_eval")
# (source file, name in reports/figures/, caption)
FIGURES = (
    ("results/linear_probe/probe_bars.png", "linear_probe_bars.png", "Linear probe, mean ± std over seeds"),
    ("results/generation_eval/ul_samples.png", "ul_samples.png", "UL stage-2 samples"),
    ("results/generation_eval/ul_recon.png", "ul_recon.png", "UL reconstructions (image | reconstruction pairs)"),
    ("results/generation_eval/soda_recon.png", "soda_recon.png", "SODA reconstructions (image | reconstruction pairs)"),
    ("results/generation_eval/soda_novel_view.png", "soda_novel_view.png",
     "SODA novel views (source | reconstruction | true target | synthesised target)"),
    ("models/ldae/grid.png", "ldae_denoising.png", "l-DAE denoising (noisy input | prediction | clean)"),
)


def fmt(v: Any, pct: bool = False, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def load_metrics(root: Path) -> tuple[dict[str, dict], list[str]]:
    found, missing = {}, []
    for stage in STAGES:
        path = root / "metrics" / f"{stage}.json"
        if path.is_file():
            found[stage] = read_json(path)
        else:
            missing.append(stage)
    return found, missing


# ---------------------------------------------------------------- sections
def section_data(m: dict) -> list[str]:
    p = m.get("prepare")
    if not p:
        return []
    c = p.get("counts", {})
    return ["## Data", "", f"Source `{p.get('source')}`, images {'x'.join(map(str, p.get('image_shape', [])))}, "
            f"{p.get('num_classes')} classes; {c.get('train')} train / {c.get('test')} test images; "
            f"{p.get('validation', {}).get('n_expectations')} data expectations passed.", ""]


def section_probe(m: dict) -> list[str]:
    lp = m.get("linear_probe")
    if not lp:
        return []
    reps = lp.get("representations", {})
    s = lp.get("settings", {})
    rows = [[f"**{n}**" if r.get("group") == "diffusion" else n, r.get("group", ""), str(r.get("dim")),
             f"{fmt(r['linear']['mean'], pct=True)} ± {100 * r['linear']['std']:.1f}", fmt(r["knn"]["mean"], pct=True)]
            for n, r in sorted(reps.items(), key=lambda kv: -kv[1]["linear"]["mean"])]
    out = ["## Linear probe", "",
           f"Frozen features -> BatchNorm (no affine) -> linear, test top-1, mean ± std over seeds {s.get('seeds')}; "
           f"weighted kNN beside it. Trained encoders in bold; baselines (raw pixels, PCA, random-init encoders) "
           f"computed in the same run. Chance: {fmt(s.get('chance'), pct=True)}.", ""]
    out += table(["representation", "group", "dim", "linear probe", "kNN"], rows)
    if lp.get("best_representation"):
        out += ["", f"Best trained representation: **{lp['best_representation']}** {fmt(lp['best_probe'], pct=True)}; "
                f"best baseline: {lp['best_baseline']} {fmt(lp['best_baseline_probe'], pct=True)} "
                f"(margin {100 * lp['margin_over_baselines']:+.1f} points)."]
    if lp.get("missing"):
        out += ["", f"Not probed (model missing): {', '.join(lp['missing'])}."]
    return out + [""]


def section_knn_normalization(m: dict) -> list[str]:
    by_norm = (m.get("ldae") or {}).get("knn_by_normalization")
    if not by_norm:
        return []
    rows = [[how, fmt(r["features"], pct=True), fmt(r["random_init"], pct=True), fmt(r["raw_pixels"], pct=True),
             f"{r['features_only']} / {r['raw_pixels_only']} (p = {r['p_value']:.2g})"] for how, r in by_norm.items()]
    out = ["## l-DAE kNN against raw pixels, by normalisation", "",
           "Weighted cosine kNN on the test split after no normalisation (the stage's kNN), centring, or "
           "standardising each dimension with training statistics (the probe's BatchNorm). Last column: test "
           "images only the features / only raw pixels get right, with the exact McNemar p-value.", ""]
    return out + table(["normalisation", "l-DAE features", "untrained l-DAE", "raw pixels",
                        "features only / pixels only"], rows) + [""]


def section_generation(m: dict) -> list[str]:
    g = m.get("generation_eval")
    if not g:
        return []
    out = ["## Generation (Unified Latents)", "",
           f"Feature space: {g.get('feature_space')}; its classifier scores "
           f"{fmt(g.get('featnet_test_accuracy'), pct=True)} "
           f"on the test split. n = {g.get('n')} images in every set. The floor compares real training images with "
           "the same real test images: no generator can be expected to do better.", ""]
    rows = []
    if "fd_featnet" in g:
        rows.append(["UL samples vs test", fmt(g["fd_featnet"]), fmt(g["fd_featnet_floor"]),
                     f"{g['fd_featnet_ratio']:.2f}x",
                     f"{fmt(g['kid_featnet'])} ± {fmt(g['kid_featnet_std'], digits=2)}",
                     fmt(g["kid_featnet_floor"])])
    if "fd_featnet_ul_recon" in g:
        floor = g.get("fd_featnet_ul_recon_floor", g["fd_featnet_floor"])
        rows.append([f"UL reconstructions vs their {g.get('recon_images', '')} test images",
                     fmt(g["fd_featnet_ul_recon"]), fmt(floor), f"{g['fd_featnet_ul_recon'] / max(floor, 1e-12):.2f}x",
                     fmt(g["kid_featnet_ul_recon"]), "—"])
    if not rows:
        rows.append(["real train vs test (floor only)", "—", fmt(g.get("fd_featnet_floor")), "—", "—",
                     fmt(g.get("kid_featnet_floor"))])
    out += table(["compared", "FD (featnet)", "floor", "FD / floor", "KID (featnet)", "KID floor"], rows)
    if "inception_fid_floor" in g:
        out += ["", "Inception FID (standard InceptionV3 weights supplied by the user):", ""]
        out += table(["compared", "Inception FID", "floor", "Inception KID"],
                     [["UL samples vs test", fmt(g.get("inception_fid")), fmt(g["inception_fid_floor"]),
                       fmt(g.get("inception_kid"))]])
    else:
        out += ["", "Inception FID: not measured (set `eval.inception_weights` to the standard weights file)."]
    return out + [""]


def section_recon(m: dict) -> list[str]:
    g, u1 = m.get("generation_eval") or {}, m.get("ul_stage1") or {}
    rows = []
    if "ul_recon_psnr" in g or "recon_psnr" in u1:
        rows.append(["UL (stage 1)", fmt(g.get("ul_recon_psnr", u1.get("recon_psnr"))),
                     fmt(g.get("ul_recon_ssim", u1.get("recon_ssim"))),
                     fmt(g.get("ul_bits_per_pixel", u1.get("bits_per_pixel")))])
    if "soda_recon_psnr" in g or "recon_psnr" in (m.get("soda") or {}):
        s = m.get("soda") or {}
        rows.append(["SODA", fmt(g.get("soda_recon_psnr", s.get("recon_psnr"))),
                     fmt(g.get("soda_recon_ssim", s.get("recon_ssim"))), "—"])
    if not rows:
        return []
    out = ["## Reconstruction", "", "PSNR (dB, [0, 1] scale) and SSIM of encode -> decode from pure noise on test "
           "images; UL bits per pixel from the prior's ELBO.", ""]
    out += table(["model", "PSNR", "SSIM", "bits/px"], rows)
    if "soda_novel_view_psnr" in g:
        out += ["", "Novel views (SODA, target pose given), beside copying the source view:", ""]
        out += table(["method", "PSNR", "SSIM"],
                     [["SODA novel view", fmt(g["soda_novel_view_psnr"]), fmt(g["soda_novel_view_ssim"])],
                      ["copy the source view", fmt(g["novel_view_psnr_copy_source"]),
                       fmt(g["novel_view_ssim_copy_source"])]])
    return out + [""]


def section_dci(m: dict) -> list[str]:
    d = (m.get("generation_eval") or {}).get("dci")
    if not d:
        return []
    rows = [[name, str(v.get("code_dim")), fmt(v["disentanglement"]), fmt(v["completeness"]), fmt(v["informativeness"])]
            for name, v in d.items()]
    method = next(iter(d.values())).get("method")
    return ["## Disentanglement (DCI)", "", f"Eastwood & Williams 2018; importances from `{method}` per factor "
            "(factors discretised), informativeness = mean test accuracy; PCA of pixels is the baseline.", ""] + \
        table(["code", "dim", "disentanglement", "completeness", "informativeness"], rows) + [""]


def section_training(m: dict) -> list[str]:
    rows = []
    for stage in ("feature_net", "soda", "ul_stage1", "ul_stage2", "ldae"):
        s = m.get(stage)
        if s:
            ips = s.get("images_per_s", s.get("latents_per_s"))
            rows.append([stage, fmt(s.get("steps")), fmt(ips, digits=3), fmt(s.get("train_s")),
                         fmt(s.get("final_loss")), fmt(s.get("wall_s"))])
    if not rows:
        return []
    out = ["## Training runs", ""] + table(["stage", "steps", "items/s", "train s", "final loss", "stage wall s"], rows)
    fn = m.get("feature_net")
    if fn:
        out += ["", f"Feature net (the FD feature space): test accuracy {fmt(fn.get('test_accuracy'), pct=True)}, "
                f"{fn.get('feature_dim')}-d features."]
    return out + [""]


def section_lineage(m: dict) -> list[str]:
    rows = []
    for stage, metrics in m.items():
        lin = metrics.get("lineage") or {}
        git = lin.get("git") or {}
        commit = (git.get("commit") or "no commit")[:12] + (" (dirty)" if git.get("dirty") else "")
        ins = "<br>".join(f"`{p}` {h[:12]}" for p, h in (lin.get("inputs") or {}).items()) or "—"
        rows.append([stage, f"`metrics/{stage}.json`", commit, ins, lin.get("finished") or "—",
                     lin.get("prefect_flow_run_id") or "—"])
    return ["## Lineage", "", "Every number above comes from these metrics files; "
            "`diffrep lineage metrics/<stage>.json` re-hashes the inputs and walks upstream.", ""] + \
        table(["stage", "metrics", "git commit", "inputs (sha256)", "finished", "flow run"], rows) + [""]


def render(cfg: Config, root: Path) -> tuple[str, list[tuple[Path, str]]]:
    """-> (markdown, [(figure source, name in figures/)]) for the metrics and images under `root`."""
    metrics, missing = load_metrics(root)
    if not metrics:
        raise ArtifactError(f"{root / 'metrics'}: no stage metrics found; run the pipeline (dvc repro) first")
    figs = [(root / src, name, cap) for src, name, cap in FIGURES if (root / src).is_file()]
    lines = ["# diffrep report", ""]
    if missing:
        lines += [f"Stages without metrics (not run yet): {', '.join(missing)}.", ""]
    for section in (section_data, section_probe, section_knn_normalization, section_generation, section_recon, section_dci, section_training):
        lines += section(metrics)
    if figs:
        lines += ["## Figures", ""]
        for _, name, cap in figs:
            lines += [f"**{cap}**", "", f"![{cap}](figures/{name})", ""]
    lines += section_lineage(metrics)
    lines += ["## Params", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines), [(src, name) for src, name, _ in figs]


def publish_prefect_artifact(md: str, *, flow_run_id: str | None = None, key: str = "diffrep-report") -> bool:
    """Publish `md` as a Prefect markdown artifact when orchestrated; returns whether it was published.

    Runs only under the pipeline flow: `flow_run_id` given (the flow calling it in-process) or
    DIFFREP_FLOW_RUN_ID set (a stage the flow started), and prefect importable. Never raises:
    a report must not fail because the orchestrator is unreachable.
    """
    run_id = flow_run_id or os.environ.get("DIFFREP_FLOW_RUN_ID")
    if not run_id:
        return False
    try:
        from prefect.artifacts import create_markdown_artifact
    except ImportError:
        return False
    try:
        create_markdown_artifact(markdown=md, key=key, description=f"diffrep report (flow run {run_id})")
    except Exception as e:  # noqa: BLE001 - the report itself is already written
        print(f"[report] could not publish the Prefect artifact: {type(e).__name__}: {e}")
        return False
    return True


def run(cfg: Config, root: Path) -> dict:
    root = Path(root)
    md, figs = render(cfg, root)
    with atomic_dir(root / OUT) as tmp:
        (tmp / "figures").mkdir()
        for src, name in figs:
            shutil.copyfile(src, tmp / "figures" / name)
        (tmp / "report.md").write_text(md)
    # From inside a stage only with a real API server: without PREFECT_API_URL prefect would start a
    # temporary server here (10-20 s). The flow can publish in-process with flow_run_id=.
    published = bool(os.environ.get("PREFECT_API_URL")) and publish_prefect_artifact(md)
    print(f"[report] wrote {root / OUT / 'report.md'} ({len(md.splitlines())} lines, {len(figs)} figures)"
          + ("; published to Prefect" if published else ""))
    return {"lines": len(md.splitlines()), "figures": len(figs), "published": published}
