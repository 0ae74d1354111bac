#!/usr/bin/env python3
"""Render main's headline numbers from metrics/*.json into README.md's results block.

    python scripts/readme_results.py           # rewrite the block between the markers (`make readme`)
    python scripts/readme_results.py --check   # exit 1, with a diff, when README's block differs

The block lies between `<!-- results:begin -->` and `<!-- results:end -->`; the
rest of README.md is never touched. Every number names the file and key it was
read from, so the README cannot drift from what the pipeline wrote. A missing
file or key renders as "—" with a warning on stderr.

A metric is a plain number, a number with a sibling key `<key>_ci95`, or
{"value"|"acc": number, "ci"|"ci95": [lo, hi]} (a 95% interval, rendered as
"value [lo, hi]"). Which key each row reads is the ROWS
table just below: change a key there and nowhere else.
Exit status: 0 ok, 1 the block differs (--check), 2 bad input (no markers, unreadable JSON).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
from pathlib import Path

# (what the row shows, file in metrics/, key, format, baseline: (label, file, key) or None).
# Keys are dotted paths into the JSON ("knn_vs_raw_pixels.p_value").
ROWS = [
    ("SODA z, linear probe (mean of 3 seeds)", "linear_probe.json", "representations.soda.linear", "pct",
     ("raw pixels", "linear_probe.json", "representations.raw_pixels.linear")),
    ("SODA z, kNN (k chosen on val)", "linear_probe.json", "representations.soda.knn", "pct",
     ("raw pixels", "linear_probe.json", "representations.raw_pixels.knn")),
    ("l-DAE tokens, linear probe (mean of 3 seeds)", "linear_probe.json", "representations.ldae.linear", "pct",
     ("raw pixels", "linear_probe.json", "representations.raw_pixels.linear")),
    ("l-DAE tokens, kNN (k chosen on val)", "linear_probe.json", "representations.ldae.knn", "pct",
     ("raw pixels", "linear_probe.json", "representations.raw_pixels.knn")),
    ("UL latent, linear probe (mean of 3 seeds)", "linear_probe.json", "representations.ul.linear", "pct",
     ("raw pixels", "linear_probe.json", "representations.raw_pixels.linear")),
    ("UL bits per pixel (test images, 8 times each)", "ul_stage1.json", "bits_per_pixel", "3f", None),
    ("UL reconstruction PSNR", "ul_stage1.json", "recon_psnr", "db", None),
    ("UL samples, FD in the feature-net space (2 sample seeds)", "generation_eval.json", "fd_featnet", "3f",
     ("real val vs test floor", "generation_eval.json", "fd_featnet_floor")),
    ("UL samples, FD above the val floor (paired bootstrap)", "generation_eval.json", "fd_featnet_above_floor",
     "signed", None),
]
COMMIT_KEY = "lineage.git.commit"  # the code commit each stage ran at

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MISSING = "—"
ROOT = Path(__file__).resolve().parent.parent
FORMATS = {
    "pct": lambda v: f"{100 * v:.1f}%",
    "3f": lambda v: f"{v:.3f}",
    "db": lambda v: f"{v:.2f} dB",
    "ratio": lambda v: f"{v:.2f}x",
    "signed": lambda v: f"{v:+.3f}",
}


class InputError(Exception):
    """Bad input the user must fix (exit 2)."""


def warn(msg: str) -> None:
    print(f"readme_results: warning: {msg}", file=sys.stderr)


def load_metrics(folder: Path, names: set[str]) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {}
    for name in sorted(names):
        path = folder / name
        if not path.exists():
            warn(f"{path} does not exist; its rows render as {MISSING} (run `make pipeline`)")
            out[name] = None
            continue
        try:
            out[name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e}); restore it with `git checkout -- {path}`") from e
    return out


def lookup(metrics: dict[str, dict | None], name: str, key: str):
    """The value at a dotted key of metrics/<name>, or None (with a warning) when absent."""
    node = metrics.get(name)
    if node is None:
        return None
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            warn(f"metrics/{name} has no key {key!r}; rendering {MISSING}")
            return None
        node = node[part]
    return node


def render_value(value, fmt: str, where: str) -> str:
    """A number, or {"value"|"acc": v, "ci"|"ci95": [lo, hi]}, in the row's format; anything else is missing."""
    f = FORMATS[fmt]
    if isinstance(value, dict) and ("value" in value or "acc" in value):
        ci = value.get("ci", value.get("ci95"))
        text = render_value(value.get("value", value.get("acc")), fmt, where)
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
            text += f" [{f(ci[0])}, {f(ci[1])}]"
        return text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f(value)
    if value is not None:
        warn(f"{where} is {value!r}, not a number; rendering {MISSING}")
    return MISSING


def with_interval(metrics: dict[str, dict | None], name: str, key: str):
    """The value at key, joined with its sibling `<key>_ci95` when the file has one."""
    value = lookup(metrics, name, key)
    parent, _, last = key.rpartition(".")
    node = metrics.get(name)
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    ci = node.get(f"{last}_ci95") if isinstance(node, dict) else None
    return {"value": value, "ci": ci} if isinstance(value, (int, float)) and ci is not None else value


def render(metrics_dir: Path) -> str:
    """The markdown between the markers (without them), ending in a newline."""
    names = {r[1] for r in ROWS} | {r[4][1] for r in ROWS if r[4]}
    metrics = load_metrics(metrics_dir, names)
    lines = [
        "| result | value | beside | read from `metrics/` (stage commit) |",
        "|---|---|---|---|",
    ]
    for label, name, key, fmt, base in ROWS:
        value = render_value(with_interval(metrics, name, key), fmt, f"metrics/{name}:{key}")
        source = f"`{name}`: `{key}`"
        beside = ""
        if base:
            b_label, b_name, b_key = base
            beside = f"{b_label} {render_value(with_interval(metrics, b_name, b_key), fmt, f'metrics/{b_name}:{b_key}')}"
            source += f" / `{b_key}`" if b_name == name else f" / `{b_name}`: `{b_key}`"
        commit = lookup(metrics, name, COMMIT_KEY) if metrics.get(name) is not None else None
        source += f" ({commit[:7]})" if isinstance(commit, str) else ""
        lines.append(f"| {label} | {value} | {beside} | {source} |")
    lines.append("")
    lines.append("Generated by `make readme` (`scripts/readme_results.py`) from the committed `metrics/`; "
                 "`make test` fails when this table and the files disagree.")
    return "\n".join(lines) + "\n"


def split_readme(text: str, path: Path) -> tuple[str, str, str]:
    """(everything up to and including BEGIN + newline, the block, END and everything after)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise InputError(f"{path} must contain exactly one {BEGIN} and one {END} line "
                         f"(found {text.count(BEGIN)} and {text.count(END)}); put them where the table goes")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    if not block.startswith("\n"):
        raise InputError(f"{path}: {BEGIN} must end its line")
    return head + BEGIN + "\n", block[1:], END + tail


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render metrics/*.json into README.md's results block.")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 when the block differs")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--metrics", type=Path, default=ROOT / "metrics", help="folder of the metrics JSON files")
    args = p.parse_args(argv)
    try:
        if not args.readme.is_file():
            raise InputError(f"{args.readme} does not exist; pass --readme PATH")
        text = args.readme.read_text(encoding="utf-8")
        head, block, tail = split_readme(text, args.readme)
        new = render(args.metrics)
    except InputError as e:
        print(f"readme_results: error: {e}", file=sys.stderr)
        return 2
    if block == new:
        print(f"{args.readme}: results block matches {args.metrics}/")
        return 0
    if args.check:
        diff = difflib.unified_diff(block.splitlines(), new.splitlines(), "README (committed)", "render of metrics/",
                                    lineterm="")
        print("\n".join(diff), file=sys.stderr)
        print(f"readme_results: {args.readme}'s results block differs from the render of {args.metrics}/ "
              "(lines above: - README, + metrics); run `make readme` and commit README.md", file=sys.stderr)
        return 1
    write_atomic(args.readme, head + new + tail)
    print(f"{args.readme}: results block rewritten from {args.metrics}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
