"""README's results table is rendered from metrics/ (scripts/readme_results.py) and cannot drift from it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "readme_results.py"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the committed README.md and metrics/*.json to edit."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "metrics").mkdir()
    for f in (ROOT / "metrics").glob("*.json"):
        shutil.copy(f, tmp_path / "metrics" / f.name)
    return tmp_path


def args(d: Path) -> list[str]:
    return ["--readme", str(d / "README.md"), "--metrics", str(d / "metrics")]


def edit_metric(d: Path, name: str, key: str, value) -> None:
    """Set (or, value None, delete) the dotted key of metrics/<name>."""
    path = d / "metrics" / name
    m = json.loads(path.read_text())
    *parents, last = key.split(".")
    node = m
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    path.write_text(json.dumps(m))


def row(d: Path, label: str) -> str:
    lines = [ln for ln in (d / "README.md").read_text().splitlines() if ln.startswith(f"| {label} |")]
    assert len(lines) == 1, lines
    return lines[0]


def test_committed_readme_matches_committed_metrics():
    r = run("--check")
    assert r.returncode == 0, r.stderr + "\n(run `make readme` and commit README.md)"


def test_readme_block_holds_mains_numbers():
    reps = json.loads((ROOT / "metrics" / "linear_probe.json").read_text())["representations"]
    text = (ROOT / "README.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]

    def pct(r: dict) -> str:
        return f"{100 * r['acc']:.1f}% [{100 * r['ci95'][0]:.1f}%, {100 * r['ci95'][1]:.1f}%]"

    assert f"| SODA z, linear probe (mean of 3 seeds) | {pct(reps['soda']['linear'])} | raw pixels " \
           f"{pct(reps['raw_pixels']['linear'])} |" in block


def test_changed_metric_fails_the_check_naming_the_row(copy: Path):
    edit_metric(copy, "linear_probe.json", "representations.soda.linear.acc", 0.5)
    r = run("--check", *args(copy))
    assert r.returncode == 1
    assert "+| SODA z, linear probe (mean of 3 seeds) | 50.0% [" in r.stderr
    assert "`representations.soda.linear`" in r.stderr and "make readme" in r.stderr
    assert "50.0%" not in (copy / "README.md").read_text()  # --check never writes


def test_write_replaces_only_the_block_and_then_checks_clean(copy: Path):
    before = (copy / "README.md").read_text()
    edit_metric(copy, "ul_stage1.json", "recon_psnr", 21.004)
    assert run(*args(copy)).returncode == 0
    after = (copy / "README.md").read_text()
    assert "| UL reconstruction PSNR | 21.00 dB [" in row(copy, "UL reconstruction PSNR")  # with its interval
    assert after.split(BEGIN)[0] == before.split(BEGIN)[0] and after.split(END)[1] == before.split(END)[1]
    assert run("--check", *args(copy)).returncode == 0
    assert not list(copy.glob(".README.md.*")), "temp file left behind"


def test_missing_key_renders_a_dash_with_a_warning(copy: Path):
    edit_metric(copy, "generation_eval.json", "fd_featnet_above_floor", None)
    r = run(*args(copy))
    assert r.returncode == 0
    assert "has no key 'fd_featnet_above_floor'" in r.stderr
    label = "UL samples, FD above the val floor (paired bootstrap)"
    assert row(copy, label).startswith(f"| {label} | — |")


def test_value_with_interval_renders_both(copy: Path):
    edit_metric(copy, "linear_probe.json", "representations.soda.knn", {"acc": 0.95, "ci95": [0.9371, 0.9638]})
    edit_metric(copy, "generation_eval.json", "fd_featnet", 2.5)
    edit_metric(copy, "generation_eval.json", "fd_featnet_ci95", [2.0, 3.25])
    assert run(*args(copy)).returncode == 0
    label = "SODA z, kNN (k chosen on val)"
    assert row(copy, label).startswith(f"| {label} | 95.0% [93.7%, 96.4%] |")
    label = "UL samples, FD in the feature-net space (2 sample seeds)"
    assert row(copy, label).startswith(f"| {label} | 2.500 [2.000, 3.250] |")  # the sibling _ci95 key


def test_readme_without_markers_is_refused_by_name(copy: Path):
    (copy / "README.md").write_text("# no table here\n")
    r = run("--check", *args(copy))
    assert r.returncode == 2
    assert BEGIN in r.stderr and END in r.stderr
    assert (copy / "README.md").read_text() == "# no table here\n"


def test_broken_metrics_json_is_refused_by_name(copy: Path):
    (copy / "metrics" / "ul_stage1.json").write_text("{not json")
    r = run(*args(copy))
    assert r.returncode == 2 and "ul_stage1.json is not valid JSON" in r.stderr
