"""`diffrep` runs the code of the checkout it is run in (checkout.py): DVC's temporary experiment copies included."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffrep.checkout import MARK, find_checkout, run_own_checkout

REPO = Path(__file__).resolve().parents[1]
DIFFREP = Path(sys.executable).parent / "diffrep"  # the console script of this interpreter's environment


def copy_checkout(dest: Path) -> Path:
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "pyproject.toml", dest)
    with (dest / "src/diffrep/__init__.py").open("a") as f:  # the copy says when it is the one imported
        f.write('\nimport sys as _s; print("imported-the-copy", file=_s.stderr)\n')
    return dest


def test_find_checkout_is_the_nearest_folder_with_the_package(tmp_path):
    co = copy_checkout(tmp_path / "co")
    (co / "pipelines/shapes").mkdir(parents=True)
    assert find_checkout(co / "pipelines/shapes") == co
    assert find_checkout(co) == co
    (tmp_path / "other").mkdir()
    assert find_checkout(tmp_path / "other") is None


@pytest.mark.skipif(not DIFFREP.is_file(), reason="needs the installed `diffrep` console script")
def test_the_command_in_another_checkout_runs_that_checkouts_code(tmp_path):
    co = copy_checkout(tmp_path / "exp")  # e.g. a queued experiment's copy under .dvc/tmp/exps
    (co / "pipelines/shapes").mkdir(parents=True)
    out = subprocess.run([str(DIFFREP), "--help"], cwd=co / "pipelines/shapes", capture_output=True, text=True)
    assert out.returncode == 0 and "usage: diffrep" in out.stdout
    assert "imported-the-copy" in out.stderr and f"running this checkout's code ({co / 'src'})" in out.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = subprocess.run([str(DIFFREP), "--help"], cwd=outside, capture_output=True, text=True)
    assert out.returncode == 0 and "imported-the-copy" not in out.stderr and "running this" not in out.stderr


def test_no_restart_in_the_imported_checkout_and_no_loop(tmp_path, monkeypatch):
    import diffrep

    run_own_checkout(["--help"], cwd=Path(diffrep.__file__).resolve().parents[2])  # returns: nothing to do
    co = copy_checkout(tmp_path / "co")
    monkeypatch.setenv(MARK, str(co.resolve()))  # as if already restarted, yet the copy is still not imported
    with pytest.raises(SystemExit, match="not this checkout's"):
        run_own_checkout(["--help"], cwd=co)
