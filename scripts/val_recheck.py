#!/usr/bin/env python3
"""Re-check on the validation split the defaults that were once chosen on test.

    python scripts/val_recheck.py ldae 'ldae.vit.patch_size=4 ldae.pca_dim=8 ldae.vit.dim=64'
    python scripts/val_recheck.py ul2 'ul.stage2.diffusion.schedule=cosine ul.stage2.diffusion.shift=1.0'
    python scripts/val_recheck.py soda 'soda.encoder_head=mean'

Needs main's pipeline outputs (`dvc repro`). Each variant (one quoted string of KEY=VALUE
overrides on params.yaml) runs in a scratch root under --work, sharing main's data/prepared
(and, for ul2, models/ul_stage1 and models/feature_net), and is compared with main on val only:
  ldae  the `ldae` stage, then `linear_probe`; val accuracy of the chosen probe lr and kNN k
        (`chosen_on_val` in metrics/linear_probe.json), beside main's;
  soda  the same for the `soda` stage;
  ul2   the `ul_stage2` stage; 500 samples of main's and the variant's base model against the
        500 real val images in the feature-net space, FD with a paired bootstrap (eval/distances.py).
Test images are never read for the choice.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# what -> the pipeline outputs every variant shares, and the stages each variant runs (also used by the
# study scripts: ul = scripts/ul_tradeoff.py, ldae and soda = scripts/ablation.py)
SHARED = {"ldae": ("data/prepared",), "soda": ("data/prepared",), "ul2": ("data/prepared", "models/ul_stage1", "models/feature_net"),
          "ul": ("data/prepared", "models/feature_net", "data/fid_reference")}
STAGES = {"ldae": ("ldae", "linear_probe"), "soda": ("soda", "linear_probe"), "ul2": ("ul_stage2",), "ul": ("ul_stage1", "ul_stage2", "generation_eval")}
CHECKS = ("ldae", "soda", "ul2")  # what this script's own command line re-checks


def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for p in parents:
        node = node[p]
    if last not in node:
        raise SystemExit(f"val_recheck: {dotted} is not a key of params.yaml")
    node[last] = value


def variant_root(what: str, overrides: str, work: Path) -> Path:
    return work / what / "_".join(o.replace("=", "-") for o in overrides.split())


def run_variant(what: str, overrides: str, work: Path, threads: int, stages: tuple[str, ...] | None = None,
                pipeline: Path = ROOT) -> Path:
    """Run STAGES[what] (or `stages`) in variant_root(...) on `pipeline`'s params.yaml plus the overrides,
    sharing its SHARED[what] outputs (the root pipeline, or e.g. pipelines/shapes); skip stages done."""
    root = variant_root(what, overrides, work)
    for rel in SHARED[what]:
        if not (root / rel).exists():
            shutil.copytree(pipeline / rel, root / rel)
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    for o in overrides.split():
        key, _, value = o.partition("=")
        set_key(params, key, yaml.safe_load(value))
    params["runtime"]["num_threads"] = threads
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for stage in stages or STAGES[what]:
        if (root / f"metrics/{stage}.json").is_file():
            continue
        with open(root / f"{stage}.log", "w") as log:
            rc = subprocess.run([sys.executable, "-m", "diffrep.cli", "stage", stage, "--params",
                                 str(root / "params.yaml"), "--root", str(root)], env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        if rc:
            raise SystemExit(f"{root}: stage {stage} exited {rc}; see {root / (stage + '.log')}")
    return root


def probe_rows(rep: str, roots: dict[str, Path]) -> list[str]:
    rows = [f"| {rep} | val linear probe (lr) | val kNN (k) |", "|---|---|---|"]
    for name, root in roots.items():
        c = json.loads((root / "metrics/linear_probe.json").read_text())["representations"][rep]["chosen_on_val"]
        rows.append(f"| {name} | {100 * c['val_linear']:.1f}% ({c['lr']:g}) | {100 * c['val_knn']:.1f}% ({c['knn_k']}) |")
    return rows


def ul2_rows(roots: dict[str, Path], seed: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))

    from diffrep.data.prepared import load_prepared
    from diffrep.eval.distances import distances
    from diffrep.eval.feature_net import load_feature_net
    from diffrep.eval.features import batched, quantise
    from diffrep.sample import sample_ul

    net = load_feature_net(ROOT / "models/feature_net")
    val = batched(net.features, load_prepared(ROOT / "data/prepared").images_float("val")).float()
    sets = {name: [batched(net.features, quantise(sample_ul(ROOT / "models/ul_stage1", root / "models/ul_stage2",
                                                             500, seed=seed, device="cpu"))).float()]
            for name, root in roots.items()}
    names = list(roots)
    d = distances(val, sets, resamples=200, seed=seed, pairs=[(n, names[0]) for n in names[1:]])
    rows = ["| UL stage 2 | FD of 500 samples vs the 500 val images |", "|---|---|"]
    rows += [f"| {n} | {d[n]['fd']:.3f} [{d[n]['fd_ci95'][0]:.3f}, {d[n]['fd_ci95'][1]:.3f}] |" for n in names]
    rows += [f"| {r['a']} − {r['b']} | {r['diff']:+.3f} [{r['diff_ci95'][0]:+.3f}, {r['diff_ci95'][1]:+.3f}], "
             f"p = {r['p_value']:.3g} |" for r in d["paired"] if r["metric"] == "fd"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=CHECKS, help="ldae / soda: that stage's settings, by val probe and kNN; ul2: the stage-2 schedule")
    p.add_argument("variants", nargs="+", help="one quoted 'KEY=VALUE KEY=VALUE' string per variant")
    p.add_argument("--work", type=Path, default=Path("/tmp/val-recheck"), help="scratch roots (outside the repo)")
    p.add_argument("--threads", type=int, default=0, help="runtime.num_threads of the variants (0: all cores)")
    a = p.parse_args(argv)
    for rel in SHARED[a.what] + ("metrics/linear_probe.json",):
        if not (ROOT / rel).exists():
            print(f"val_recheck: {ROOT / rel} is missing; run `dvc repro` first", file=sys.stderr)
            return 2
    roots = {"main": ROOT} | {v: run_variant(a.what, v, a.work, a.threads) for v in a.variants}
    seed = yaml.safe_load((ROOT / "params.yaml").read_text())["seed"]
    print("\n".join(ul2_rows(roots, seed) if a.what == "ul2" else probe_rows(a.what, roots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
