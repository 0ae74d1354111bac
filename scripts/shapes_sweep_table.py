#!/usr/bin/env python3
"""The shapes sweeps (scripts/shapes_sweeps.sh) as one markdown table, from `dvc exp show`.

    python scripts/shapes_sweep_table.py                 # runs `dvc exp show -A --json` in the repository
    python scripts/shapes_sweep_table.py --json FILE     # or reads its saved output (experiment list)

`dvc exp show` lists the experiments; their metrics and params are read whole from each experiment's
git commit (`git show REV:FILE`: `dvc exp show` keeps the numbers but drops the intervals).

One row per finished `shapes-*` experiment, after the baseline row of the commit it ran on (that
commit's own metrics, i.e. main's lineage there): the params it changed, novel views (k = 1 PSNR and
FD, PSNR at the largest k), DCI of SODA's z with its 95% interval, the best edit specificity (raw and
over the noise floor, when the run measured it), and the
linear probe of z on the shape class when the pipeline had that stage. Intervals are each run's own
95% bootstrap over test objects; two rows are not paired here (different runs), so a difference
whose intervals overlap is not shown to be real. Queued, running or failed experiments are listed
under the table. Exit status: 0 ok, 2 bad input (unreadable JSON, `dvc` failed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from diffrep.audit import flatten  # nested params -> the dotted keys DVC shows

PARAMS, EVAL = "pipelines/shapes/params.yaml", "pipelines/shapes/metrics/shapes_eval.json"
PROBE = "pipelines/shapes/metrics/linear_probe.json"
SWEPT = ("soda", "shapes_eval")  # the sections whose changes name a row


def ci(v: float, lo_hi, digits: int) -> str:
    return f"{v:.{digits}f} [{lo_hi[0]:.{digits}f}, {lo_hi[1]:.{digits}f}]"


def git_json(rev: str, path: str):
    """A JSON or YAML file as committed at `rev`; None if it is not there."""
    got = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    if got.returncode:
        return None
    import yaml  # YAML is a superset of JSON: one reader for params and metrics

    return yaml.safe_load(got.stdout)


def swept(rev: str) -> dict:
    p = git_json(rev, PARAMS) or {}
    return flatten({s: p.get(s) or {} for s in SWEPT})


def row(name: str, rev: str, base_params: dict) -> list[str] | None:
    m = git_json(rev, EVAL)
    if not m:
        return None
    changed = ", ".join(f"`{k}={v}`" for k, v in swept(rev).items() if base_params.get(k) != v) or "(baseline)"
    s = m["shapes_eval"]
    nv, soda = s["novel_views"]["methods"], s["dci"]["codes"]["soda"]
    ks = sorted(int(k.removeprefix("soda_k")) for k in nv if k.startswith("soda_k"))
    k1, kn = nv[f"soda_k{ks[0]}"], nv[f"soda_k{ks[-1]}"]
    probe = ((git_json(rev, PROBE) or {}).get("representations") or {}).get("soda")
    return [name, changed, ci(k1["psnr"], k1["psnr_ci95"], 2), f"{k1['fd']:.2f}", f"k={ks[-1]}: {kn['psnr']:.2f}",
            ci(soda["disentanglement"], soda["disentanglement_ci95"], 3), f"{soda['completeness']:.3f}",
            f"{soda['informativeness']:.3f}", f"{m['edit_specificity_max']:.2f}",
            f"{m['edit_specificity_over_floor_max']:.2f}" if "edit_specificity_over_floor_max" in m else "-",
            ci(100 * probe["linear"]["acc"], [100 * x for x in probe["linear"]["ci95"]], 1) if probe else "-"]


def table(show: list[dict]) -> str:
    head = ["experiment", "changed", "NVS PSNR k=1 (dB)", "NVS FD k=1", "NVS PSNR, most k", "DCI D (SODA z)", "C",
            "I", "edit spec. max", "over the floor", "probe of z (%)"]
    lines, pending = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], []
    for commit in show:
        exps = [r for e in (commit.get("experiments") or []) for r in e.get("revs", [])
                if (r.get("name") or "").startswith("shapes-")]
        if not exps or commit.get("rev") == "workspace":
            continue
        base = swept(commit["rev"])
        rows = [row(f"baseline `{commit['rev'][:7]}`", commit["rev"], base)]
        for r in exps:
            d = r.get("data") or {}  # queued: no metrics yet; running: dvc shows the workspace's
            done = d.get("metrics") and d.get("rev") != "workspace"
            got = row(r["name"], r["rev"], base) if done else None
            (rows.append(got) if got else pending.append(f"{r['name']} (on `{commit['rev'][:7]}`): no metrics yet "
                                                          "(queued, running or failed: `dvc queue status`)"))
        lines += ["| " + " | ".join(x) + " |" for x in rows if x]
    return "\n".join(lines + ([""] + [f"- {p}" for p in pending] if pending else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="saved `dvc exp show -A --json` output (default: run it)")
    a = ap.parse_args(argv)
    try:
        text = a.json.read_text() if a.json else subprocess.run(
            ["dvc", "exp", "show", "-A", "--json"], capture_output=True, text=True, check=True).stdout
        show = json.loads(text)
    except (OSError, json.JSONDecodeError, subprocess.CalledProcessError) as e:
        print(f"error: could not read the experiments ({e}); run it inside the repository, with dvc on PATH",
              file=sys.stderr)
        return 2
    print(table(show))
    return 0


if __name__ == "__main__":
    sys.exit(main())
