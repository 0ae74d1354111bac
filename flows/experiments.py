"""DVC experiments under Prefect: one `dvc exp run` or a queued sweep, then a comparison table artifact.

DVC decides what runs and keeps every result (a git ref per experiment, shown by
`dvc exp show`); this flow runs the commands, streams their output to the Prefect
log and publishes a table of the swept params and the headline metrics.

    python -m flows.experiments -S ul.stage1.loss_factor=1.5,3,6
    python -m flows.experiments -S soda.z_dim=64,96 -S seed=0,1      # 4 experiments (the product)
    python -m flows.experiments -S ul.stage1.loss_factor=6 --name lf6  # one, no queue

One setting: `dvc exp run --temp -S k=v -n NAME` (in a temporary copy: the
workspace and params.yaml stay as they are). Several: `dvc exp run --queue -S ...`
for each, then `dvc exp run --run-all` (each in its own temporary copy).
Either way the experiments are built from the last commit (plus uncommitted
changes to tracked files), so `git commit` first. Results: `dvc exp show`,
`dvc exp apply NAME` to bring one into the workspace.
"""
from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from diffrep.audit import dvc_executable
from flows.pipeline import dvc_env, run_streamed

# The numbers people compare across experiments: metrics file -> keys. Those absent are left out.
HEADLINE = {
    "metrics/generation_eval.json": ("fd_featnet", "fd_featnet_ratio", "kid_featnet"),
    "metrics/linear_probe.json": ("probe_soda", "knn_soda", "probe_ul", "probe_ldae", "knn_ldae", "probe_raw_pixels",
                                  "knn_raw_pixels"),
    "metrics/soda.json": ("recon_psnr", "online.val_knn_selected", "online.selected_step"),
    "metrics/ul_stage1.json": ("bits_per_pixel", "recon_psnr", "online.val_knn_selected"),
    "metrics/ldae.json": ("online.val_knn_selected", "online.selected_step"),
    "metrics/feature_net.json": ("test_accuracy",),
}


class ExperimentFailed(RuntimeError):
    """A `dvc exp` command failed; the message quotes the end of its stderr."""


# ---------------------------------------------------------------- the sweep
def _split_values(text: str) -> list[str]:
    """"1.5,3,6" -> ["1.5", "3", "6"]; commas inside [...] or {...} stay (a list value is one value)."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    return values + [cur]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """["a=1,2", "b=x"] -> [["a=1", "b=x"], ["a=2", "b=x"]]: the product of every -S's values."""
    axes = []
    for o in overrides:
        key, sep, values = o.partition("=")
        if not sep or not key.strip() or not values:
            raise ValueError(f"-S {o!r}: expected KEY=VALUE[,VALUE...], e.g. ul.stage1.loss_factor=1.5,3")
        axes.append([f"{key.strip()}={v.strip()}" for v in _split_values(values)])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def swept_keys(overrides: list[str]) -> list[str]:
    return [o.partition("=")[0].strip() for o in overrides]


# ---------------------------------------------------------------- dvc exp
def _dvc(args: list[str], root: Path, timeout_s: float | None = None, flow_run_id: str | None = None) -> list[str]:
    """`dvc ARGS` streamed to the Prefect log; returns its last stdout lines; raises ExperimentFailed."""
    log = get_run_logger()
    dvc = dvc_executable()
    log.info("$ dvc %s", " ".join(args))
    rc, out, err = run_streamed([dvc, *args], root, dvc_env(dvc, flow_run_id), log, timeout_s)
    if rc != 0:
        why = f"timed out after {timeout_s:g} s" if rc is None else f"exit {rc}"
        raise ExperimentFailed(f"`dvc {' '.join(args)}` failed ({why}); last stderr lines:\n" + "\n".join(err))
    return list(out)


def _set_args(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("-S", s)]


@task(task_run_name="exp-{name}")
def run_one(name: str, settings: list[str], root: str, timeout_s: float | None, flow_run_id: str | None) -> str:
    """One experiment in a temporary copy of the repo: the workspace's params.yaml is not rewritten."""
    _dvc(["exp", "run", "--temp", "-n", name, *_set_args(settings)], Path(root), timeout_s, flow_run_id)
    return name


@task(task_run_name="queue-{name}")
def queue_one(name: str, settings: list[str], root: str) -> str:
    _dvc(["exp", "run", "--queue", "-n", name, *_set_args(settings)], Path(root))
    return name


@task
def run_queue(root: str, jobs: int, timeout_s: float | None, flow_run_id: str | None) -> None:
    """Every queued experiment, `jobs` at a time (each in its own temporary copy)."""
    _dvc(["exp", "run", "--run-all", "-j", str(jobs)], Path(root), timeout_s, flow_run_id)


def exp_show(root: Path) -> list[dict[str, Any]]:
    """dvc.api.exp_show(): one flat row per commit and experiment of the current commit."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return dvc.api.exp_show(repo=str(root))
    except DvcException as e:
        raise ExperimentFailed(f"dvc.api.exp_show({str(root)!r}) failed: {e}") from e


# ---------------------------------------------------------------- the comparison table
MISSING = ("!", "-", "")  # how exp_show marks a value a row does not have


def _runs(show: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(the baseline commit's row, {experiment name: its row}) from dvc.api.exp_show()."""
    commits = [r for r in show if r.get("typ") == "baseline" and r.get("rev") != "workspace"]
    exps = {r.get("Experiment") or str(r.get("rev"))[:7]: r for r in show if str(r.get("typ", "")).startswith("branch")}
    return (commits[0] if commits else None), exps


def _metrics_files(row: dict[str, Any]) -> set[str]:
    """Metrics files DVC named in the row (every diffrep metrics file has lineage.*, a key they share)."""
    return {c.split(":", 1)[0] for c in row if ":" in c and c.split(":", 1)[0].endswith(".json")}


def _get(row: dict[str, Any], name: str, file: str | None = None) -> Any:
    """A value by DVC's column name: `file:key` where two files share the key, else the bare key.

    A bare metric key is taken for `file` only if that file is in the row (or the row names no file: a
    project with one metrics file) and no other HEADLINE file in the row lists the same key, so one
    file's recon_psnr is never shown as another's.
    """
    cols = [f"{file}:{name}"] if file else [name, f"params.yaml:{name}"]
    files = _metrics_files(row)
    if file and (not files or file in files) and not any(f != file and name in keys and f in files
                                                         for f, keys in HEADLINE.items()):
        cols.append(name)
    for col in cols:
        if col in row:
            v = row[col]
            return None if isinstance(v, str) and v in MISSING else v
    return None


def metric_columns(rows: list[dict[str, Any]], params: list[str]) -> list[tuple[str | None, str]]:
    """(file, key) pairs to show: the HEADLINE ones present; else every number but the swept params and lineage."""
    cols = [(f, k) for f, keys in HEADLINE.items() for k in keys if any(_get(r, k, f) is not None for r in rows)]
    if cols:
        return cols
    skip = {"rev", *params, *(f"params.yaml:{p}" for p in params)}
    return sorted({(None, c) for r in rows for c, v in r.items() if c not in skip and "lineage." not in c
                   and isinstance(v, (int, float)) and not isinstance(v, bool)})


def _column(file: str | None, key: str) -> str:
    return f"{Path(file).stem}.{key}" if file else key  # metrics/soda.json, knn_z -> soda.knn_z


def comparison_rows(show: list[dict[str, Any]], names: list[str], params: list[str]) -> list[dict[str, Any]]:
    """One row for the baseline commit, one per experiment in `names` (in that order), swept params + metrics.

    An experiment that DVC does not list (it failed) keeps its row, state "failed", no values.
    """
    base, exps = _runs(show)
    entries = ([("baseline", base)] if base else []) + [(n, exps.get(n)) for n in names]
    cols = metric_columns([e for _, e in entries if e is not None], params)
    rows = []
    for name, entry in entries:
        row: dict[str, Any] = {"experiment": name, "rev": str((entry or {}).get("rev") or "")[:7],
                               "state": "ok" if entry is not None else "failed"}
        row.update({k: _get(entry or {}, k) for k in params})
        row.update({_column(f, k): _get(entry or {}, k, f) for f, k in cols})
        rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text columns for the terminal."""
    if not rows:
        return "(no experiments)"
    cols = list(rows[0])
    cell = [[("" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])) for c in cols]
            for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cell)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(x, widths)) for x in cell]
    return "\n".join(lines)


# ---------------------------------------------------------------- the flow
def _check_git(root: Path) -> None:
    """`dvc exp` builds experiments from a commit: say so before DVC does, less cryptically."""
    ok = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode == 0
    if not ok:
        raise ExperimentFailed(f"{root}: `dvc exp` needs a git commit to start from; "
                               "run `git add -A && git commit -m baseline` first")


@flow(name="diffrep-experiments")
def experiments_flow(
    set_params: list[str],
    name: str | None = None,
    root: str = ".",
    jobs: int = 1,
    timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """Run the experiments of `set_params` (-S KEY=V1,V2,...; several -S: their product) and publish the
    comparison table (artifact `experiments`). Returns the table's rows; raises if any experiment failed."""
    log = get_run_logger()
    root_p = Path(root).resolve()
    _check_git(root_p)
    sets = expand_sweep(set_params)
    prefix = name or flow_run.name or time.strftime("exp-%Y%m%d-%H%M%S")
    names = [prefix] if len(sets) == 1 else [f"{prefix}-{i + 1}" for i in range(len(sets))]
    run_id = flow_run.id
    log.info("%d experiment(s): %s", len(sets), "; ".join(f"{n}: {' '.join(s)}" for n, s in zip(names, sets)))
    failure: Exception | None = None
    try:
        if len(sets) == 1:
            run_one(names[0], sets[0], str(root_p), timeout_s, run_id)
        else:
            for n, s in zip(names, sets):
                queue_one(n, s, str(root_p))
            run_queue(str(root_p), jobs, timeout_s, run_id)
    except ExperimentFailed as e:  # still publish what did finish
        failure = e
    rows = comparison_rows(exp_show(root_p), names, swept_keys(set_params))
    create_table_artifact(table=rows, key="experiments",
                          description=f"`dvc exp show` of {len(names)} experiment(s) beside the baseline commit; "
                                      f"swept: {', '.join(swept_keys(set_params)) or 'nothing'}")
    log.info("comparison:\n%s", render_table(rows))
    failed = [r["experiment"] for r in rows if r["state"] == "failed"]
    if failure is not None or failed:
        raise failure or ExperimentFailed(f"experiment(s) not in `dvc exp show`: {', '.join(failed)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.experiments", description=__doc__.splitlines()[0],
                                epilog="Runs under a temporary Prefect server unless PREFECT_API_URL is set.")
    p.add_argument("-S", "--set-param", dest="set_params", action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="a params.yaml override; several values make a sweep; several -S: their product")
    p.add_argument("-n", "--name", default=None,
                   help="experiment name (a sweep: NAME-1, NAME-2, ...); default: the Prefect flow-run name")
    p.add_argument("-j", "--jobs", type=int, default=1, help="queued experiments run at a time (default 1)")
    p.add_argument("--timeout-s", type=float, default=None, help="wall-clock limit of each dvc exp run command")
    p.add_argument("--root", default=".", help="the DVC project folder (default: .)")
    args = p.parse_args(argv)
    if not args.set_params:
        p.error("give at least one -S KEY=VALUE")
    try:
        expand_sweep(args.set_params)  # a typo is a usage error before any server starts
    except ValueError as e:
        p.error(str(e))
    try:
        rows = experiments_flow(set_params=args.set_params, name=args.name, root=args.root, jobs=args.jobs,
                                timeout_s=args.timeout_s)
    except ExperimentFailed as e:
        print(f"experiments failed: {e}", file=sys.stderr)
        return 1
    print(render_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
