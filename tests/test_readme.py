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
    path = d / "metrics" / name
    m = json.loads(path.read_text())
    if value is None:
        del m[key]
    else:
        m[key] = value
    path.write_text(json.dumps(m))


def row(d: Path, label: str) -> str:
    lines = [ln for ln in (d / "README.md").read_text().splitlines() if ln.startswith(f"| {label} |")]
    assert len(lines) == 1, lines
    return lines[0]


def test_committed_readme_matches_committed_metrics():
    r = run("--check")
    assert r.returncode == 0, r.stderr + "\n(run `make readme` and commit README.md)"


def test_readme_block_holds_mains_numbers():
    m = json.loads((ROOT / "metrics" / "linear_probe.json").read_text())
    text = (ROOT / "README.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert f"| SODA z, linear probe (mean of 3 seeds) | {100 * m['probe_soda']:.1f}% | raw pixels " \
           f"{100 * m['probe_raw_pixels']:.1f}% |" in block


def test_changed_metric_fails_the_check_naming_the_row(copy: Path):
    edit_metric(copy, "linear_probe.json", "probe_soda", 0.5)
    r = run("--check", *args(copy))
    assert r.returncode == 1
    assert "+| SODA z, linear probe (mean of 3 seeds) | 50.0% |" in r.stderr
    assert "`probe_soda`" in r.stderr and "make readme" in r.stderr
    assert "50.0%" not in (copy / "README.md").read_text()  # --check never writes


def test_write_replaces_only_the_block_and_then_checks_clean(copy: Path):
    before = (copy / "README.md").read_text()
    edit_metric(copy, "ul_stage1.json", "recon_psnr", 21.004)
    assert run(*args(copy)).returncode == 0
    after = (copy / "README.md").read_text()
    assert "| UL reconstruction PSNR | 21.00 dB |" in row(copy, "UL reconstruction PSNR")
    assert after.split(BEGIN)[0] == before.split(BEGIN)[0] and after.split(END)[1] == before.split(END)[1]
    assert run("--check", *args(copy)).returncode == 0
    assert not list(copy.glob(".README.md.*")), "temp file left behind"


def test_missing_key_renders_a_dash_with_a_warning(copy: Path):
    edit_metric(copy, "generation_eval.json", "fd_featnet_ratio", None)
    r = run(*args(copy))
    assert r.returncode == 0
    assert "has no key 'fd_featnet_ratio'" in r.stderr
    assert row(copy, "UL samples, FD / floor").startswith("| UL samples, FD / floor | — |")


def test_value_with_interval_renders_both(copy: Path):
    edit_metric(copy, "linear_probe.json", "knn_soda", {"value": 0.95, "ci": [0.9371, 0.9638]})
    assert run(*args(copy)).returncode == 0
    assert row(copy, "SODA z, kNN (k = 20)").startswith("| SODA z, kNN (k = 20) | 95.0% [93.7%, 96.4%] |")


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
