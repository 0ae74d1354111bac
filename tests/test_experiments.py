"""DVC experiments: `dvc exp run -S` on the real `prepare` stage, and the experiments flow on a fake stage."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `flows` lives at the repo root, outside the installed package
pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(*cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def commit_repo(root: Path) -> Path:
    """git + dvc init and a first commit: `dvc exp` starts every experiment from a commit."""
    sh("git", "init", "-q", ".", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "baseline", cwd=root)
    return root


def exp_metrics(root: Path) -> dict[str, dict]:
    """{experiment name: {metrics file: data}} of the baseline commit, from `dvc exp show --json`."""
    show = json.loads(sh("dvc", "exp", "show", "--json", cwd=root).stdout)
    base = next(e for e in show if e["rev"] != "workspace")
    return {r["name"]: {f: m.get("data") for f, m in r["data"]["metrics"].items()}
            for g in base.get("experiments") or [] for r in g["revs"]}


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    site = tmp_path_factory.mktemp("dvc-site")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(site), "GX_ANALYTICS_ENABLED": "false",
                     "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                     "GIT_COMMITTER_EMAIL": "t@t"}.items():
            mp.setenv(k, v)
        yield


# ---------------------------------------------------------------- no DVC, no Prefect
def test_expand_sweep_is_the_product_of_every_set():
    from flows.experiments import expand_sweep, swept_keys

    assert expand_sweep(["a.b=1.5,3,6"]) == [["a.b=1.5"], ["a.b=3"], ["a.b=6"]]
    assert expand_sweep(["x=1,2", "y=u"]) == [["x=1", "y=u"], ["x=2", "y=u"]]
    assert expand_sweep(["m=[1,2],[4,8]"]) == [["m=[1,2]"], ["m=[4,8]"]]  # a list value is one value
    assert swept_keys(["x=1,2", " y =u"]) == ["x", "y"]
    for bad in ("novalue", "=3", "k="):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            expand_sweep([bad])


def test_comparison_rows_from_exp_show_json():
    from flows.experiments import comparison_rows

    # dvc.api.exp_show() rows: a key two files share is named `file:key`, a unique one is bare; "!" = absent
    def row(typ, rev, name, lr, psnr, **more):
        return {"Experiment": name, "rev": rev, "typ": typ, "train.lr": lr, "metrics/soda.json:recon_psnr": psnr,
                "metrics/soda.json:lineage.stage": "soda", "metrics/ul_stage1.json:lineage.stage": "ul_stage1",
                "metrics/ul_stage1.json:recon_psnr": "!", "metrics/linear_probe.json:lineage.stage": "linear_probe",
                **more}

    show = [row("baseline", "workspace", None, 0.1, 0.9, probe_soda=0.5),
            row("baseline", "aaaaaaa111", None, 0.1, 0.9, probe_soda=0.5, steps=5),
            row("branch_commit", "bbbbbbb222", "s-1", 0.2, 0.8, probe_soda="!")]
    rows = comparison_rows(show, ["s-1", "s-2"], ["train.lr"])
    assert rows == [
        {"experiment": "baseline", "rev": "aaaaaaa", "state": "ok", "train.lr": 0.1, "linear_probe.probe_soda": 0.5,
         "soda.recon_psnr": 0.9},
        {"experiment": "s-1", "rev": "bbbbbbb", "state": "ok", "train.lr": 0.2, "linear_probe.probe_soda": None,
         "soda.recon_psnr": 0.8},
        {"experiment": "s-2", "rev": "", "state": "failed", "train.lr": None, "linear_probe.probe_soda": None,
         "soda.recon_psnr": None},
    ]  # headline metrics only (not steps); ul_stage1's recon_psnr absent everywhere; s-2 failed: DVC does not list it
    # a bare key is never given to a file that is not in the row: soda's bits_per_pixel is not ul_stage1's
    only_soda = [{"Experiment": None, "rev": "c" * 9, "typ": "baseline", "bits_per_pixel": 1.0, "recon_psnr": 7.0,
                  "metrics/soda.json:lineage.stage": "soda"}]
    assert comparison_rows(only_soda, [], []) == [
        {"experiment": "baseline", "rev": "ccccccc", "state": "ok", "soda.recon_psnr": 7.0}]


def test_cli_help_and_usage_errors(capsys):
    from flows.experiments import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "-S KEY=V1[,V2...]" in capsys.readouterr().out
    for argv in ([], ["-S", "nokey"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_sweep_scripts_print_help_and_refuse_arguments_without_queueing(script, tmp_path):
    # a `dvc` first on PATH that records any call: neither --help nor a stray argument may start the sweep
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dvc").write_text(f"#!/bin/sh\ntouch {tmp_path}/dvc-called\nexit 99\n")
    (fake / "dvc").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    run = lambda *argv: subprocess.run(["bash", str(script), *argv], env=env, capture_output=True, text=True)
    helped, refused = run("--help"), run("--jobs", "4")
    assert helped.returncode == 0 and "DVC experiments" in helped.stdout and "set -euo" not in helped.stdout
    assert refused.returncode == 2 and "takes no arguments (got: --jobs 4)" in refused.stderr
    assert not (tmp_path / "dvc-called").exists()


# ---------------------------------------------------------------- plain DVC on the real prepare stage
def real_prepare_repo(root: Path, params: str) -> Path:
    """A git + DVC repository holding main's `prepare` stage, its code and data/raw/."""
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "data/raw", root / "data/raw", dirs_exist_ok=True)
    shutil.copy(ROOT / ".gitignore", root)
    dag = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": dag["stages"]["prepare"]}}))
    (root / "params.yaml").write_text(params)
    return commit_repo(root)


def test_an_image_changed_in_data_raw_makes_prepare_stale(tmp_path):
    from conftest import make_imagefolder, write_image

    root = tmp_path / "r"
    make_imagefolder(root / "data/raw/pets", {"cats": 5, "dogs": 5})
    real_prepare_repo(root, "seed: 0\ndata: {source: imagefolder, path: data/raw/pets, image_size: 8, min_rows: 4}\n")
    assert "pets" not in sh("git", "ls-files", cwd=root).stdout  # data/raw/.gitignore: DVC versions the data, not git
    sh("dvc", "repro", cwd=root)
    assert "up to date" in sh("dvc", "status", cwd=root).stdout
    src = json.loads((root / "metrics/prepare.json").read_text())["lineage"]["params"]["source"]
    assert src["tracked_by_dvc"] is True

    write_image(root / "data/raw/pets/dogs/new.png", seed=99)
    status = sh("dvc", "status", cwd=root).stdout
    assert "prepare:" in status and "data/raw" in status


def test_dvc_exp_run_on_real_prepare_shows_its_metrics(tmp_path):
    root = tmp_path / "r"
    params = "seed: 0\ndata: {source: digits, image_size: 8, test_fraction: 0.2}\n"
    real_prepare_repo(root, params)

    sh("dvc", "exp", "run", "--temp", "-n", "tf30", "-S", "data.test_fraction=0.3", cwd=root)
    m = exp_metrics(root)["tf30"]["metrics/prepare.json"]
    assert 530 <= m["counts"]["test"] <= 545  # about 30% of 1,797 (stratified): the override took effect
    assert m["lineage"]["params"]["data"]["test_fraction"] == 0.3
    assert (root / "params.yaml").read_text() == params  # --temp: the workspace is untouched


# ---------------------------------------------------------------- the flow on a fake stage
STAGE_PY = """
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
if p["train"]["lr"] < 0:
    raise SystemExit("lr must be positive")
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"recon_psnr": round(1 - p["train"]["lr"], 3), "steps": p["train"]["steps"], "lineage": {"stage": "soda"}},
          open("metrics/soda.json", "w"))
"""
DVC_YAML = f"""
stages:
  soda:
    cmd: {sys.executable} stage.py
    deps: [stage.py]
    params: [train]
    metrics:
      - metrics/soda.json: {{cache: false}}
"""
PARAMS = "seed: 0\ntrain: {lr: 0.1, steps: 3}\n"


@pytest.fixture
def fake_repo(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    (root / "stage.py").write_text(STAGE_PY)
    (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (root / "params.yaml").write_text(PARAMS)
    sh("git", "init", "-q", ".", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("dvc", "repro", cwd=root)  # the baseline's own metrics, committed
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "baseline", cwd=root)
    return root


def artifact(key: str):
    import asyncio

    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    return next(a for a in asyncio.run(go()) if a.key == key)


def test_flow_runs_a_queued_sweep_and_publishes_the_table(prefect_server, fake_repo):
    from flows.experiments import experiments_flow

    rows = experiments_flow(set_params=["train.lr=0.2,0.4", "train.steps=7"], name="sw", root=str(fake_repo))
    assert [(r["experiment"], r["state"], r["train.lr"], r["train.steps"], r["soda.recon_psnr"]) for r in rows] == [
        ("baseline", "ok", 0.1, 3, 0.9), ("sw-1", "ok", 0.2, 7, 0.8), ("sw-2", "ok", 0.4, 7, 0.6)]
    assert (fake_repo / "params.yaml").read_text() == PARAMS  # the queue ran in temporary copies
    assert set(exp_metrics(fake_repo)) == {"sw-1", "sw-2"}  # plain DVC sees them too

    table = artifact("experiments").data
    table = json.loads(table) if isinstance(table, str) else table
    assert [r["experiment"] for r in table] == ["baseline", "sw-1", "sw-2"]
    assert "steps" not in json.dumps(table).replace("train.steps", "")  # headline metrics only


def test_failed_experiment_fails_the_flow_after_publishing(prefect_server, fake_repo):
    from flows.experiments import ExperimentFailed, experiments_flow

    state = experiments_flow(set_params=["train.lr=-1"], name="neg", root=str(fake_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(ExperimentFailed, match="lr must be positive"):
        state.result()
    table = artifact("experiments").data
    table = json.loads(table) if isinstance(table, str) else table
    assert [(r["experiment"], r["state"]) for r in table] == [("baseline", "ok"), ("neg", "failed")]


@pytest.mark.parametrize("script, flag, args", [("ul_tradeoff.py", "--factors", []),
                                               ("ablation.py", "--seeds", ["soda", "soda.views", "augment", "same"])])
def test_study_scripts_help_and_refuse_to_run_without_the_pipeline_outputs(tmp_path, script, flag, args):
    path = Path(__file__).resolve().parents[1] / "scripts" / script
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and flag in out.stdout and "--seeds" in out.stdout
    # a copy of the scripts in a tree without data/prepared: refused before anything runs
    shutil.copytree(path.parent, tmp_path / "scripts")
    out = subprocess.run([sys.executable, str(tmp_path / "scripts" / script), *args, "--work", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "data/prepared is missing; run `dvc repro` first" in out.stderr
    assert not (tmp_path / "w").exists()


def test_val_recheck_refuses_unknown_keys_and_missing_outputs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts/val_recheck.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ldae" in out.stdout and "ul2" in out.stdout
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/val_recheck.py").write_text(script.read_text())
    out = subprocess.run([sys.executable, str(tmp_path / "scripts/val_recheck.py"), "ldae", "ldae.pca_dim=8",
                          "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "data/prepared is missing; run `dvc repro` first" in out.stderr
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("val_recheck", script)
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    params = {"ldae": {"pca_dim": 16}}
    mod.set_key(params, "ldae.pca_dim", 8)
    assert params == {"ldae": {"pca_dim": 8}}
    with pytest.raises(SystemExit, match="ldae.pca_dims is not a key"):
        mod.set_key(params, "ldae.pca_dims", 8)
