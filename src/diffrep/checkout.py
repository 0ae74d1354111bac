"""Run the code of the checkout a command runs in, not the one `diffrep` happens to be installed from.

An editable install (`pip install -e .`) puts one checkout's `src/` on every interpreter's path. DVC
runs queued and `--temp` experiments in a copy of the repository (`.dvc/tmp/exps/...`) at the
experiment's commit; without this, their stages would import the *workspace's* current `src/`,
while dvc.lock and the metrics' lineage name the experiment's commit and its file hashes. So the
`diffrep` command, run inside any diffrep checkout (a folder with `pyproject.toml` and
`src/diffrep/`, at or above the working directory) whose package is not the one imported, starts
again with that checkout's `src/` first on `PYTHONPATH` (once: a marker stops a loop).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

MARK = "DIFFREP_CHECKOUT"  # set on the re-started process: the checkout it must run


def find_checkout(start: Path) -> Path | None:
    """The nearest folder at or above `start` that is a diffrep checkout, or None."""
    for d in (start, *start.parents):
        if (d / "pyproject.toml").is_file() and (d / "src/diffrep/__init__.py").is_file():
            return d
    return None


def run_own_checkout(argv: list[str], cwd: Path | None = None) -> None:
    """Re-execute `python -m diffrep argv` with the checkout's code if another copy was imported; else return."""
    import diffrep

    here = find_checkout((cwd or Path.cwd()).resolve())
    if here is None:
        return
    want, got = (here / "src/diffrep").resolve(), Path(diffrep.__file__).resolve().parent
    if want == got:
        return
    if os.environ.get(MARK) == str(here):  # already re-started and still not importing it: say so, never loop
        raise SystemExit(f"error: diffrep imports {got}, not this checkout's {want} even with it first on "
                         "PYTHONPATH; check PYTHONPATH and the installed packages")
    env = dict(os.environ, **{MARK: str(here)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here / "src"), env.get("PYTHONPATH")) if p)
    print(f"[diffrep] running this checkout's code ({here / 'src'}), not the installed {got.parent}",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "diffrep", *argv], env)
