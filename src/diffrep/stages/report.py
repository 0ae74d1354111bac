"""`report` stage: one markdown page with every metric beside its baselines and floors.

Reads metrics/<stage>.json of every stage (a missing one is named, not an
error: a partial pipeline still gets a report) and the image grids the stages
wrote; writes reports/report.md and reports/figures/*.png (copies, linked
relatively, so the folder is self-contained). Sections: data, linear probe
(with raw-pixel, PCA and random-init baselines, 95% intervals), the comparisons
(every sentence's verb comes from its paired test: "beats"/"loses" only at
p < 0.05, else "ties"), generation (FD and KID in the feature-net space against
the stored test reference, beside the honest val floor and the older train
floor; Inception FID only when measured), reconstruction and bits/px, novel
views and DCI when the data has them, training runs, the resolved params and
the lineage summary (stage -> git commit, input hashes) of every metrics file.

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
STAGES = ("prepare", "feature_net", "fid_reference", "soda", "ul_stage1", "ul_stage2", "ldae", "linear_probe",
          "generation_eval")
# (source file, name in reports/figures/, caption)
FIGURES = (
    ("results/linear_probe/probe_bars.png", "linear_probe_bars.png", "Linear probe on test, 95% intervals"),
    ("results/generation_eval/ul_samples.png", "ul_samples.png", "UL stage-2 samples"),
    ("results/generation_eval/ul_recon.png", "ul_recon.png", "UL reconstructions (image | reconstruction pairs)"),
    ("models/soda/grid.png", "soda_views.png",
     "SODA reconstructions (image | reconstruction; with poses: source | reconstruction | true target | novel view)"),
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


def ci(summary: dict | None, pct: bool = True) -> str:
    """`96.4% [95.2, 97.5]` from {acc|fd|kid, ci95}."""
    if not summary:
        return "—"
    v = summary.get("acc", summary.get("value"))
    lo, hi = summary["ci95"]
    if pct:
        return f"{100 * v:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{fmt(v)} [{fmt(lo, digits=3)}, {fmt(hi, digits=3)}]"


def with_ci(m: dict, key: str) -> str:
    """`18.89 [18.41, 19.36]`: m[key] and its sibling m[key_ci95] when the stage wrote one."""
    if m.get(key) is None:
        return "—"
    lo_hi = m.get(f"{key}_ci95")
    return fmt(m[key]) + (f" [{fmt(lo_hi[0], digits=3)}, {fmt(lo_hi[1], digits=3)}]" if lo_hi else "")


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
    out = ["## Data", "", f"Source `{p.get('source')}`, images {'x'.join(map(str, p.get('image_shape', [])))}, "
           f"{p.get('num_classes')} classes; {c.get('train')} train / {c.get('val')} val / {c.get('test')} test "
           f"images; {p.get('validation', {}).get('n_expectations')} data expectations passed. Every choice "
           "(probe lr, kNN k, best baseline) is made on val; test is read once, for the numbers below.", ""]
    balance = p.get("class_balance", {})
    splits = [s for s in ("train", "val", "test") if isinstance(balance.get(s), dict)]
    if splits:  # images per class, by name
        names = list(balance[splits[0]])
        out += table(["class", *splits], [[n, *(str(balance[s].get(n, 0)) for s in splits)] for n in names]) + [""]
    return out


BASELINE_NOTES = {
    "raw_pixels": "the flattened images",
    "pca": "top principal components of the pixels (fitted on train)",
    "ldae_random_init": "untrained l-DAE: exactly a random linear map of its PCA-projected patches plus fixed "
                        "positions (adaLN-zero makes every block the identity at init)",
    "soda_random_init": "SODA's encoder at a random init",
    "ul_random_init": "UL's encoder at a random init",
}


def section_probe(m: dict) -> list[str]:
    lp = m.get("linear_probe")
    if not lp:
        return []
    reps = lp.get("representations", {})
    s = lp.get("settings", {})
    rows = [[f"**{n}**" if r.get("group") == "diffusion" else n, str(r.get("dim")), ci(r.get("linear")),
             fmt(r.get("linear", {}).get("lr")), ci(r.get("knn")), str(r.get("knn", {}).get("k")),
             BASELINE_NOTES.get(n, "trained encoder" if r.get("group") == "diffusion" else "")]
            for n, r in sorted(reps.items(), key=lambda kv: -kv[1]["linear"]["acc"])]
    out = ["## Linear probe and kNN", "",
           f"Frozen features -> BatchNorm (no affine) -> linear, trained once per seed {s.get('seeds')}, per-image "
           "correctness averaged over seeds (95% bootstrap interval over test images); weighted cosine kNN beside it "
           f"(95% Wilson interval). lr and k chosen on val. Chance: {fmt(s.get('chance'), pct=True)}.", ""]
    out += table(["representation", "dim", "linear probe", "lr", "kNN", "k", "what it is"], rows)
    if lp.get("missing"):
        out += ["", f"Not probed (model missing): {', '.join(lp['missing'])}."]
    return out + [""] + section_comparisons(lp)


def sentence(r: dict, what: str) -> str:
    """One generated sentence per paired test; the verb is the test's verdict (eval/paired.py)."""
    verb = {"beats": "beats", "loses": "loses to", "ties": "ties with"}[r["verdict"]]
    counts = f"{r['a_only']} / {r['b_only']} discordant images, " if "a_only" in r else ""
    return f"- **{r['a']}** {verb} **{r['b']}** {what} ({counts}{r['test']}, p = {r['p_value']:.2g})."


def section_comparisons(lp: dict) -> list[str]:
    rows = lp.get("comparisons") or []
    if not rows:
        return []
    reps = lp.get("representations", {})
    out = ["### What the paired tests say", "",
           f"Each trained representation against the best baseline on val (linear: "
           f"{lp.get('best_baseline', {}).get('linear')}, kNN: {lp.get('best_baseline', {}).get('knn')}) and against "
           "each other method, on the same test images. \"beats\" needs p < 0.05.", ""]
    for r in rows:
        clf = "under the linear probe" if r["classifier"] == "linear" else "under kNN"
        a, b = reps[r["a"]][r["classifier"]]["acc"], reps[r["b"]][r["classifier"]]["acc"]
        out.append(sentence(r, f"{clf}, {100 * a:.1f}% vs {100 * b:.1f}%"))
    return out + [""]


def section_knn_normalization(m: dict) -> list[str]:
    by_norm = dict((m.get("linear_probe") or {}).get("knn_by_normalization") or {})
    k = by_norm.pop("k", None)
    if not by_norm:
        return []
    rows = [[how, fmt(r["features"], pct=True), fmt(r["random_init"], pct=True), fmt(r["raw_pixels"], pct=True),
             f"{r['features_only']} / {r['raw_pixels_only']} (p = {r['p_value']:.2g})"] for how, r in by_norm.items()]
    out = ["## l-DAE kNN against raw pixels, by normalisation", "",
           f"Weighted cosine kNN (k = {k}, chosen on val) on the test split after no normalisation, centring, or "
           "standardising each dimension with training statistics (the probe's BatchNorm). Last column: test "
           "images only the features / only raw pixels get right, with the exact McNemar p-value.", ""]
    return out + table(["normalisation", "l-DAE features", "untrained l-DAE", "raw pixels",
                        "features only / pixels only"], rows) + [""]


SET_NAMES = {"samples": "UL samples", "floor_val": "real val images (honest floor)",
             "floor_train": "real train images (older floor: the feature net trained on them)",
             "recon": "UL reconstructions"}


def ratio_end(hi: float) -> str:
    """A ratio's upper interval end: unbounded once the floor's own interval reaches 0."""
    return fmt(hi, digits=3) if hi < 1e3 else "unbounded: the floor's interval reaches 0"


def distance_rows(d: dict) -> list[list[str]]:
    return [[SET_NAMES.get(name, name), str(sum(v["n"])), ci({"value": v["fd"], "ci95": v["fd_ci95"]}, pct=False),
             ci({"value": v["kid"], "ci95": v["kid_ci95"]}, pct=False)]
            for name, v in d.items() if isinstance(v, dict) and "fd" in v]


def section_generation(m: dict) -> list[str]:
    g = m.get("generation_eval")
    if not g or "featnet" not in g:
        return []
    ref = g.get("reference", {})
    out = ["## Generation (Unified Latents)", "",
           f"Feature space: {g.get('feature_space')}; its classifier scores "
           f"{fmt(g.get('featnet_test_accuracy'), pct=True)} on the test split. Reference: the {ref.get('n')} real "
           f"{ref.get('set')} images, `{ref.get('path')}/{ref.get('file')}` (sha256 "
           f"{str(ref.get('files', {}).get(ref.get('file'), ''))[:12]}). FD and KID with 95% bootstrap intervals; "
           "samples: the mean over independent sample seeds.", ""]
    out += table(["set vs the reference", "images", "FD (featnet)", "KID (featnet)"], distance_rows(g["featnet"]))
    out += [""]
    for r in g["featnet"]["paired"]:
        if r["metric"] == "fd":
            ratio = f"; {r['ratio']:.2f}x [{fmt(r['ratio_ci95'][0], digits=3)}, {ratio_end(r['ratio_ci95'][1])}]" \
                if "ratio" in r else ""
            verdict = "differs from" if r["p_value"] < 0.05 else "cannot be told from"
            out.append(f"- FD of {SET_NAMES.get(r['a'], r['a'])} {verdict} that of {SET_NAMES.get(r['b'], r['b'])}: "
                       f"difference {r['diff']:+.3g} [{r['diff_ci95'][0]:+.3g}, {r['diff_ci95'][1]:+.3g}]{ratio} "
                       f"({r['test']}, p = {r['p_value']:.2g}).")
    rec = g.get("ul_recon_featnet")
    if rec:
        out += ["", f"UL reconstructions of {rec['n']} test images against those images (as many val images beside "
                "them as the floor):", ""]
        out += table(["set vs the originals", "images", "FD (featnet)", "KID (featnet)"], distance_rows(rec))
    if "inception" in g:
        out += ["", "Inception FID (standard InceptionV3 weights supplied by the user), reference = the test images:", ""]
        out += table(["set vs the reference", "images", "FD (Inception)", "KID (Inception)"],
                     distance_rows(g["inception"]))
    else:
        out += ["", "Inception FID: not measured (set `eval.inception_weights` to the standard weights file)."]
    return out + [""]


def section_recon(m: dict) -> list[str]:
    u1, sd = m.get("ul_stage1") or {}, m.get("soda") or {}
    rows = []
    if "recon_psnr" in u1:
        rows.append(["UL (stage 1)", with_ci(u1, "recon_psnr"), with_ci(u1, "recon_ssim"), with_ci(u1, "bits_per_pixel")])
    if "recon_psnr" in sd:
        rows.append(["SODA", with_ci(sd, "recon_psnr"), with_ci(sd, "recon_ssim"), "—"])
    if not rows:
        return []
    out = ["## Reconstruction", "", "PSNR (dB, [0, 1] scale) and SSIM of encode -> decode from pure noise on test "
           "images (quantised to 8 bits like the data); UL bits per pixel from the prior's ELBO. Each is a mean over "
           "test images with its 95% bootstrap interval over those images.", ""]
    out += table(["model", "PSNR", "SSIM", "bits/px"], rows)
    if "novel_view_psnr" in sd:
        out += ["", "Novel views (SODA, target pose given), beside copying the source view:", ""]
        out += table(["method", "PSNR", "SSIM"],
                     [["SODA novel view", with_ci(sd, "novel_view_psnr"), with_ci(sd, "novel_view_ssim")],
                      ["copy the source view", fmt(sd["novel_view_psnr_copy_source"]),
                       fmt(sd["novel_view_ssim_copy_source"])]])
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
