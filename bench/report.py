"""Write a run: <UTC timestamp>.json (atomic), latest.json (a copy) and latest.md (the docs/benchmarks.md tables)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from bench.models import LABELS
from diffrep.io import write_json, write_text


def timestamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_run(run: dict, out_dir: Path, stamp: str) -> Path:
    """Every file goes through a temporary file and a rename: a killed run leaves no half-written JSON."""
    path = out_dir / f"{stamp}.json"
    write_json(path, run)
    write_json(out_dir / "latest.json", run)
    write_text(out_dir / "latest.md", markdown(run))
    return path


def _f(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt) if isinstance(v, float) else str(v)


def _threads(matmul: dict) -> str:
    if matmul["device"] != "cpu":
        return matmul["device"]
    return f"{matmul['threads']} thread{'s' if matmul['threads'] != 1 else ''}"


def _train_table(rows: list[dict], matmul: dict) -> list[str]:
    out = [f"Training step (forward + backward + AdamW + EMA), {rows[0]['device']}, {rows[0]['precision']}; "
           f"matmul yardstick {matmul['gflops']:.1f} GFLOP/s ({matmul['dtype']}, {_threads(matmul)}, "
           "measured in the same run):", "",
           "| model | batch | img/s | step (median) | MFLOP/img | GFLOP/s | share of matmul |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {LABELS.get(r['model'], r['model'])} | {r['batch_size']} | {r['img_per_s']:.0f} | "
                   f"{r['step_ms_median']:.0f} ms | {r['mflop_per_image']:.1f} | {r['gflops']:.1f} | "
                   f"{100 * r['share_of_matmul']:.0f}% |")
    return out + [""]


def markdown(run: dict) -> str:
    m, mm = run["machine"], run["matmul"]
    git = m["git"]
    lines = [f"### Benchmarks ({run['created']}, `python -m bench`)", "",
             f"Machine: {m['cpu_model']}, {m['cores']} cores, {_threads(mm)}, torch {m['torch']}, "
             f"{'CUDA ' + m['cuda']['name'] if m['cuda'] else 'no CUDA'}; code at {str(git.get('commit'))[:10]}"
             f"{' (dirty)' if git.get('dirty') else ''}; load average {m['load_avg_start'][0]} at the start.", ""]
    if run["train"]:
        lines += _train_table(run["train"], mm)
    if run.get("train_cuda"):
        lines += _train_table(run["train_cuda"], run["matmul_cuda"])
    if run["sampling"]:
        lines += ["| sampling | device | images per call | steps | img/s |", "|---|---|---|---|---|"]
        for s in run["sampling"]:
            steps = " + ".join(f"{v} {k}" for k, v in s["steps"].items())
            lines.append(f"| {s['what']} | {s['device']} | {s['n']} | {steps} | {s['img_per_s']:.1f} |")
        lines.append("")
    p = run.get("pipeline")
    if p:
        lines += [f"Pipeline from scratch (fresh clone of {p['commit'][:10]}): full `dvc repro -f` "
                  f"{p['full_repro_s']:.0f} s, no-op `dvc repro` {_f(p['noop_repro_s'], '.1f')} s.", "",
                  "| stage | wall time | peak RSS |", "|---|---|---|"]
        lines += [f"| `{s['stage']}` | {s['wall_s']:.1f} s | {s['peak_rss_mib']:.0f} MiB |" for s in p["stages"]]
        lines.append("")
    q = run.get("quality")
    if q and q["files"]:
        lines += [f"Quality at the default budget (from {q['source']}):", "", "| stage | commit | metric | value |",
                  "|---|---|---|---|"]
        for stage, f in q["files"].items():
            commit = str(f["commit"])[:10] + (" (dirty)" if f["dirty"] else "")
            for k, v in f["values"].items():
                if not any(k.endswith(s) for s in ("_s", "per_s")):  # speed is in the tables above
                    lines.append(f"| {stage} | {commit} | {k} | {_f(v, '.4g')} |")
        if q["missing"]:
            lines.append(f"\nNot in that folder: {', '.join(q['missing'])}.")
        lines.append("")
    return "\n".join(lines)
