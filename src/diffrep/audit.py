"""`diffrep lineage METRICS_FILE`: trace a number back to what made it (docs/lineage.md).

Three independent witnesses must agree for a link to be intact:
  1. the lineage block in each metrics file (sha256 of inputs and outputs),
  2. the files on disk now (re-hashed with `path_hash`),
  3. `dvc.lock` (the stage's params vs params.yaml now, and `dvc status` for
     its deps and outs, md5 as DVC records them).
The walk goes upstream from the stage that wrote METRICS_FILE: every input
that another stage lists among its outs leads to that stage's metrics file,
until stages that read only source data or code.

Exit 0: every link intact; 1: something changed or is missing (named at the
end); 2: usage error (no such file, not a metrics file, not a DVC project,
dvc itself failing, a recorded path outside the root: the audit never reads
outside the project root, whatever a metrics file says).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from diffrep.config import dotted_get
from diffrep.dvc_folder import changed_files
from diffrep.io import ArtifactError, path_hash

EXIT_OK, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2
_MISSING = object()  # a --key absent from a metrics file (None is a legal metric value)
_CODE_DIRS = ("src/", "flows/")


class AuditError(Exception):
    """The audit cannot be carried out (usage error, exit 2); not a finding about the artifacts."""


@dataclasses.dataclass
class Artifact:
    path: str  # relative to the project root, as the lineage block records it
    role: str  # "in" | "out"
    recorded: str | None  # sha256 in the lineage block
    current: str | None  # sha256 on disk now; None when the path is gone

    @property
    def status(self) -> str:
        if self.current is None:
            return "MISSING"
        return "OK" if self.current == self.recorded else "CHANGED"


@dataclasses.dataclass
class Link:
    """One stage of the chain: what it read and wrote, how, and what is wrong with it."""

    stage: str
    metrics_file: str | None
    artifacts: list[Artifact] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # dvc.lock params, dotted leaves
    git: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: Any = None
    finished: str | None = None
    flow_run_id: str | None = None
    value: Any = _MISSING  # the --key metric in this stage's metrics file
    upstream: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["artifacts"] = [{**dataclasses.asdict(a), "status": a.status} for a in self.artifacts]
        if self.value is _MISSING:
            d.pop("value")
        return d


# ---------------------------------------------------------------- the project on disk
@dataclasses.dataclass
class Project:
    root: Path
    dvc_yaml: dict[str, Any]  # stage name -> dvc.yaml definition
    lock: dict[str, Any] | None  # stage name -> dvc.lock entry; None when there is no dvc.lock
    _hashes: dict[str, str | None] = dataclasses.field(default_factory=dict)
    _params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> "Project":
        dvc_yaml = _read_yaml(root / "dvc.yaml")
        if dvc_yaml is None:
            raise AuditError(f"{root / 'dvc.yaml'}: not found; pass --root pointing at the DVC project")
        lock = _read_yaml(root / "dvc.lock")
        return cls(root, dvc_yaml.get("stages") or {}, None if lock is None else lock.get("stages") or {})

    def inside(self, rel: str, who: str) -> Path:
        """root / rel, refused (AuditError) when it is absolute or resolves outside the root (`..`, a symlink)."""
        p = self.root / rel
        if Path(rel).is_absolute() or not p.resolve().is_relative_to(self.root.resolve()):
            raise AuditError(f"{who} {rel!r}, which lies outside the project root {self.root}; the audit reads "
                             "only files inside the root: regenerate that metrics file with its stage")
        return p

    def hash(self, rel: str, who: str = "a lineage block records") -> str | None:
        """sha256 now, cached: an upstream output is also a downstream input."""
        if rel not in self._hashes:
            path = self.inside(rel, who)
            try:
                self._hashes[rel] = path_hash(path)
            except ArtifactError:
                self._hashes[rel] = None
        return self._hashes[rel]

    def param_now(self, file: str, key: str) -> Any:
        if file not in self._params:
            self._params[file] = _read_yaml(self.root / file)
        return dotted_get(self._params[file], key, _MISSING)

    def in_dvc_yaml(self, stage: str) -> bool:
        return stage.split("@")[0] in self.dvc_yaml  # foreach/matrix stages are "name@key" in dvc.lock

    def producers(self, path: str) -> list[str]:
        """The stages whose outs hold `path` (or a folder that holds it, or lie inside it)."""
        return [
            stage
            for stage, outs in self._outs().items()
            if any(path == o or path.startswith(o + "/") or o.startswith(path + "/") for o in outs)
        ]

    def _outs(self) -> dict[str, list[str]]:
        if self.lock:
            return {s: [_norm(o["path"]) for o in e.get("outs", [])] for s, e in self.lock.items()}
        return {s: dvc_paths(d.get("outs")) for s, d in self.dvc_yaml.items()}

    def metrics_file(self, stage: str) -> str | None:
        """The stage's metrics file: its first JSON `metrics:` entry in dvc.yaml, else metrics/<stage>.json if present.

        A declared file that is missing is a finding; a stage that declares none may simply write no metrics.
        """
        for p in dvc_paths(self.dvc_yaml.get(stage.split("@")[0], {}).get("metrics")):
            if p.endswith(".json") and "${" not in p:
                return p
        fallback = f"metrics/{stage}.json"
        return fallback if (self.root / fallback).is_file() else None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise AuditError(f"{path}: not valid YAML ({e})") from e


def dvc_paths(entries: list[Any] | None) -> list[str]:
    """dvc.yaml deps/outs/metrics/plots entries ("path" or {"path": {options}}) as normalised relative paths."""
    return [_norm(e if isinstance(e, str) else next(iter(e))) for e in entries or []]


def _norm(p: str) -> str:
    return Path(p).as_posix().removeprefix("./").rstrip("/")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}: params and metrics as dotted keys, the way DVC names them."""
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def lookup(metrics: dict[str, Any], key: str) -> Any:
    """A metric by name: a literal key first, then a dotted path (`probe.soda.mean`)."""
    return metrics[key] if key in metrics else dotted_get(metrics, key, _MISSING)


def load_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AuditError(f"{path}: metrics file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AuditError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("lineage"), dict):
        raise AuditError(f"{path}: no 'lineage' block; only metrics files written by diffrep stages can be audited")
    return data


# ---------------------------------------------------------------- checks
def check_stage(proj: Project, stage: str, metrics_rel: str | None, key: str | None) -> Link:
    """Everything that can be checked for one stage without DVC: lineage vs disk, dvc.lock params vs params.yaml."""
    link = Link(stage, metrics_rel)
    metrics = None
    if metrics_rel is not None:
        where = proj.inside(metrics_rel, f"stage {stage!r} has its metrics file at")  # outside: refused, not a finding
        try:
            metrics = load_metrics(where)
        except AuditError as e:
            link.problems.append(f"metrics file {metrics_rel} MISSING" if not (proj.root / metrics_rel).exists() else str(e))
    if metrics is not None:
        lin = metrics["lineage"]
        if lin.get("stage") not in (None, stage):
            link.problems.append(f"{metrics_rel} says it was written by stage {lin.get('stage')!r}, not {stage!r}")
        for role, group in (("in", "inputs"), ("out", "outputs")):
            for rel, recorded in (lin.get(group) or {}).items():
                a = Artifact(rel, role, recorded, proj.hash(rel, f"{metrics_rel} records {role}put"))
                link.artifacts.append(a)
                if a.status == "MISSING":
                    link.problems.append(f"{role}put {rel} MISSING (recorded {recorded[:12]})")
                elif a.status == "CHANGED":
                    inside = changed_files(proj.root, proj.lock, rel)  # name the files, not only the folder
                    link.problems.append(f"{role}put {rel} CHANGED (recorded {recorded[:12]}, now {a.current[:12]})"
                                         + (f": {inside}" if inside else ""))
        link.git = lin.get("git") or {}
        link.seed, link.finished, link.flow_run_id = lin.get("seed"), lin.get("finished"), lin.get("prefect_flow_run_id")
        if key is not None:
            link.value = lookup(metrics, key)

    if proj.lock is None:
        link.problems.append("no dvc.lock: the pipeline was never reproduced with `dvc repro`")
        return link
    entry = proj.lock.get(stage)
    if entry is None:
        link.problems.append(f"stage {stage!r} has no dvc.lock entry; run `dvc repro {stage}`")
        return link
    if not proj.in_dvc_yaml(stage):
        link.problems.append(f"stage {stage!r} is in dvc.lock but no longer in dvc.yaml")
    for file, values in (entry.get("params") or {}).items():
        for name, locked in flatten(values).items():
            link.params[name] = locked
            now = proj.param_now(file, name)
            if now is _MISSING:
                link.problems.append(f"param {name} = {locked!r} in dvc.lock is no longer in {file}")
            elif now != locked:
                link.problems.append(f"param {name} changed: {locked!r} (dvc.lock) -> {now!r} ({file})")
    return link


def dvc_executable() -> str:
    """The dvc beside this Python (a venv that is not activated), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    found = str(here) if here.is_file() else shutil.which("dvc")
    if found is None:
        raise AuditError("dvc not found; install diffrep's dependencies (`make setup`)")
    return found


def dvc_status(root: Path, stages: list[str]) -> dict[str, list[Any]]:
    """One `dvc status --json` for the whole chain: {stage: [changes]}; {} when all match dvc.lock."""
    if not stages:
        return {}
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [dvc_executable(), "status", "--json", *stages]
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AuditError(f"`{' '.join(cmd[1:])}` could not run: {e}") from e
    if out.returncode != 0:
        raise AuditError(f"`{' '.join(cmd[1:])}` failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
    text = out.stdout.strip()
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:  # a warning printed ahead of the JSON
        return json.loads(text.splitlines()[-1])


def apply_dvc_status(link: Link, changes: list[Any]) -> None:
    """Turn `dvc status` entries into problems, skipping what the re-hash or the params check already named."""
    named = {a.path for a in link.artifacts if a.status != "OK"}
    for change in changes:
        if isinstance(change, str):  # "always changed", "changed checksum", ...
            link.problems.append(f"dvc status: {change}")
            continue
        for kind, entries in change.items():
            for path, state in entries.items():
                if isinstance(state, dict):  # a params file: {key: "modified"}
                    for name, s in state.items():
                        if not any(p.startswith((f"param {name} ", f"param {name}.")) for p in link.problems):
                            link.problems.append(f"param {name} {s} since dvc.lock ({path})")
                elif path in named:
                    continue
                elif kind == "changed deps" and (path.startswith(_CODE_DIRS) or path.endswith(".py")):
                    link.problems.append(f"code changed: {path} {state} since dvc.lock")
                else:
                    what = "dep" if kind == "changed deps" else "out"
                    link.problems.append(f"{what} {path} {state} since dvc.lock")


def walk(proj: Project, stage: str, metrics_rel: str, key: str | None) -> list[Link]:
    """The chain from `stage` upstream, depth first, each stage once; then one dvc call for all of it."""
    chain: list[Link] = []
    seen: set[str] = set()

    def visit(name: str, mrel: str | None) -> None:
        seen.add(name)
        link = check_stage(proj, name, mrel, key)
        chain.append(link)
        entry = (proj.lock or {}).get(name) or {}
        reads = [a.path for a in link.artifacts if a.role == "in"] + [_norm(d["path"]) for d in entry.get("deps", [])]
        for path in dict.fromkeys(reads):
            for up in proj.producers(path):
                if up != name and up not in link.upstream:
                    link.upstream.append(up)
        for up in link.upstream:
            if up not in seen:
                visit(up, proj.metrics_file(up))

    visit(stage, metrics_rel)
    checkable = [l.stage for l in chain if proj.lock and l.stage in proj.lock and proj.in_dvc_yaml(l.stage)]
    status = dvc_status(proj.root, checkable)
    for link in chain:
        apply_dvc_status(link, status.get(link.stage, []))
    return chain


# ---------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    return "None" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def render(chain: list[Link], metrics_rel: str, key: str | None) -> str:
    head = f"lineage of {metrics_rel}"
    if key is not None:
        head += f"  ({key} = {_fmt(chain[0].value)})"
    lines = [head, ""]
    for link in chain:
        lines.append(f"stage {link.stage}" + (f"  [{link.metrics_file}]" if link.metrics_file else ""))
        commit = (link.git.get("commit") or "no commit")[:12] + (" (dirty)" if link.git.get("dirty") else "")
        lines.append(f"  git      {commit}   seed {link.seed}   finished {link.finished}")
        if link.flow_run_id:
            lines.append(f"  flow run {link.flow_run_id}")
        if link.params:
            lines.append("  params   " + ", ".join(f"{k}={_fmt(v)}" for k, v in link.params.items()))
        width = max((len(a.path) for a in link.artifacts), default=0)
        for a in link.artifacts:
            lines.append(f"  {a.role:<8} {a.path:<{width}}  {(a.current or a.recorded or '')[:12]:<12}  {a.status}")
        if key is not None and link.value is not _MISSING:
            lines.append(f"  {key} = {_fmt(link.value)}")
        lines.append("  upstream " + (", ".join(link.upstream) or "none (reads only source data and code)"))
        lines.append("")
    broken = [f"{l.stage}: {p}" for l in chain for p in l.problems]
    if broken:
        lines.append(f"BROKEN LINKS ({len(broken)}):")
        lines += [f"  - {b}" for b in broken]
    else:
        n = sum(len(l.artifacts) for l in chain)
        lines.append(f"chain intact: {len(chain)} stage(s), {n} artifact(s) re-hashed, dvc.lock agrees")
    return "\n".join(lines)


def main(args: Any) -> int:
    root = Path(getattr(args, "root", ".") or ".").resolve()
    key = getattr(args, "key", None)
    try:
        proj = Project.load(root)
        given = Path(args.metrics_file)
        path = given if given.is_absolute() or given.exists() else root / given
        metrics = load_metrics(path)
        try:
            metrics_rel = path.resolve().relative_to(root).as_posix()
        except ValueError:
            raise AuditError(f"{path}: lies outside the project root {root}; pass --root") from None
        if key is not None and lookup(metrics, key) is _MISSING:
            keys = ", ".join(k for k in flatten({k: v for k, v in metrics.items() if k != "lineage"}))
            raise AuditError(f"{metrics_rel}: no metric {key!r}; available: {keys}")
        stage = metrics["lineage"].get("stage")
        if not stage:
            raise AuditError(f"{metrics_rel}: its lineage block names no stage")
        chain = walk(proj, stage, metrics_rel, key)
    except AuditError as e:
        print(f"diffrep lineage: {e}", file=sys.stderr)
        return EXIT_USAGE
    broken = [f"{l.stage}: {p}" for l in chain for p in l.problems]
    if getattr(args, "json", False):
        out = {"metrics_file": metrics_rel, "key": key, "intact": not broken, "broken": broken,
               "chain": [l.to_dict() for l in chain]}
        if key is not None:
            out["value"] = chain[0].value
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(chain, metrics_rel, key))
    return EXIT_BROKEN if broken else EXIT_OK
