"""The daily loop on a tiny pipeline in a temporary repository (docs/daily-loop.md):

  two `dvc exp run`s of prepare -> soda + ldae on digits (8x8) with the online val kNN on and
  train.select: best; then `dvc exp show` (through dvc.api.exp_show) with the chosen steps, the val kNN
  curves, `dvc plots diff` of the two experiments (grids side by side, curves overlaid) and
  `dvc artifacts get` of a version tagged GTO-style (name@vX.Y.Z).

    python scripts/online_demo.py [--keep DIR]     # DIR: where the repository is built (default: a temp dir)

Takes a few minutes on 2 cores. Nothing in this repository is touched.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_dvc_repo  # noqa: E402  (the tests' tiny-repository builder)

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "soda", "ldae"]
TRAIN = {"steps": 240, "batch_size": 64, "lr": 2e-3, "warmup_steps": 10, "ckpt_every": 80, "log_every": 10,
         "eval_every": 30, "select": "best"}
TINY = {
    "seed": 0,
    "data": {"source": "digits", "image_size": 8},
    "runtime": {"device": "cpu", "num_threads": 1},
    "soda": {"z_dim": 16, "encoder": {"width": 8, "depth": 1, "stages": 2},
             "unet": {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [4], "groups": 4, "heads": 1},
             "diffusion": {"sample_steps": 5}, "train": TRAIN, "eval_images": 16},
    "ldae": {"pca_dim": 4, "pca_fit_patches": 1000, "vit": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2},
             "train": {**TRAIN, "lr": 4e-3}},
    "probe": {"knn_k": [5, 10, 20], "knn_temperature": 0.07},
}


def sh(*cmd: str, cwd: Path) -> str:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="demo", GIT_AUTHOR_EMAIL="demo@localhost", GIT_COMMITTER_NAME="demo",
               GIT_COMMITTER_EMAIL="demo@localhost", DVC_SITE_CACHE_DIR=str(cwd / ".cache/dvc-site"))
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def build(root: Path) -> None:
    tiny_dvc_repo(root, STAGES, TINY, sh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="build the repository here (must not exist) and keep it")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="diffrep-online-"))
    root.mkdir(parents=True, exist_ok=args.keep is None)
    build(root)
    print(f"repository: {root}")
    sh("dvc", "exp", "run", "-n", "lr-default", cwd=root)
    sh("dvc", "exp", "run", "-n", "lr-low", "-S", "soda.train.lr=5e-4", "-S", "ldae.train.lr=1e-3", cwd=root)

    import dvc.api

    rows = dvc.api.exp_show(repo=str(root))
    for r in rows:
        if r.get("Experiment") in ("lr-default", "lr-low"):
            shown = {k: v for k, v in r.items() if "selected" in k or "best_step" in k or k.endswith(".lr")}
            print(r["Experiment"], shown)
    for name in ("lr-default", "lr-low"):
        for stage in ("soda", "ldae"):
            tsv = sh("git", "show", f"refs/exps/{_ref(root, name)}:metrics/{stage}_online.tsv", cwd=root)
            print(f"--- {name} metrics/{stage}_online.tsv\n{tsv}", end="")
    sh("dvc", "plots", "diff", "lr-default", "lr-low", "-o", "plots_diff", cwd=root)
    print(f"dvc plots diff -> {root / 'plots_diff/index.html'}")

    # the registry: keep one experiment, tag its l-DAE GTO-style, fetch that version
    sh("dvc", "exp", "apply", "lr-default", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "keep lr-default", cwd=root)
    sh("git", "tag", "-a", "ldae@v1.0.0", "-m", "l-DAE, tiny digits demo", cwd=root)
    out = root.parent / f"{root.name}-ldae-v1"
    sh("dvc", "artifacts", "get", str(root), "ldae", "--rev", "v1.0.0", "-o", str(out), cwd=root)
    print(f"dvc artifacts get {root} ldae --rev v1.0.0 -> {sorted(p.name for p in out.iterdir())}")


def _ref(root: Path, name: str) -> str:
    refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=root).split()
    return next(r for r in refs if r.endswith("/" + name)).removeprefix("refs/exps/")


if __name__ == "__main__":
    main()
