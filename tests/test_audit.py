"""`diffrep lineage`: a two-stage fake pipeline run by real `dvc repro`, then tampered with."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffrep import audit, cli

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).parent / "dvc")

# One script serves both stages; the lineage block comes from the real diffrep.lineage.
STAGE_PY = '''
import json, sys, pathlib, yaml
from diffrep.lineage import lineage_block
name = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))
if name == "a":
    n = len(open("raw.txt").read().split()) * p["a"]["scale"]
    pathlib.Path("data/a").mkdir(parents=True, exist_ok=True)
    pathlib.Path("data/a/x.txt").write_text(str(n))
    ins, outs, metrics = ["raw.txt"], ["data/a"], {"count": n}
else:
    v = int(pathlib.Path("data/a/x.txt").read_text()) + p["b"]["offset"]
    pathlib.Path("data/b.txt").write_text(str(v))
    pathlib.Path("models/b").mkdir(parents=True, exist_ok=True)  # a model folder: checkpoint + grid
    pathlib.Path("models/b/model.pt").write_bytes(bytes([v]) * 64)
    pathlib.Path("models/b/grid.png").write_bytes(b"png")
    ins, outs = ["data/a/x.txt"], ["data/b.txt", "models/b"]
    metrics = {"fd": v + 0.25, "probe": {"soda": {"mean": 0.5}}}
metrics["lineage"] = lineage_block(name, p, ins, outs, seed=p["seed"])
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump(metrics, open(f"metrics/{name}.json", "w"))
'''

DVC_YAML = f"""
stages:
  a:
    cmd: {sys.executable} stage.py a
    deps: [stage.py, raw.txt]
    params: [seed, a]
    outs: [data/a]
    metrics:
      - metrics/a.json:
          cache: false
  b:
    cmd: {sys.executable} stage.py b
    deps: [stage.py, data/a/x.txt]
    params: [b.offset]
    outs: [data/b.txt, models/b]
    metrics:
      - metrics/b.json:
          cache: false
"""

PARAMS = "seed: 0\na:\n  scale: 2\nb:\n  offset: 1\n"


def _sh(*cmd: str, cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A reproduced two-stage project (built once; each test works on a copy)."""
    root = tmp_path_factory.mktemp("proj")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site")))
        (root / "stage.py").write_text(STAGE_PY)
        (root / "raw.txt").write_text("the raw source data\n")
        (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
        (root / "params.yaml").write_text(PARAMS)
        _sh("git", "init", "-q", ".", cwd=root)
        _sh(DVC, "init", "-q", cwd=root)
        _sh("git", "add", "-A", cwd=root)
        _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=root)
        _sh(DVC, "repro", cwd=root)
        yield root


@pytest.fixture
def proj(built, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    root = tmp_path / "p"
    shutil.copytree(built, root, symlinks=True)
    return root


def run(root: Path, metrics: str = "metrics/b.json", key: str | None = None, as_json: bool = False) -> int:
    return audit.main(argparse.Namespace(metrics_file=metrics, key=key, json=as_json, root=str(root)))


def test_intact_chain_exits_0_and_prints_both_stages(proj, capsys):
    assert run(proj) == 0
    out = capsys.readouterr().out
    assert "stage b" in out and "stage a" in out
    assert out.index("stage b") < out.index("stage a")  # from the number back to the source
    assert "chain intact: 2 stage(s)" in out
    assert "a.scale=2" in out and "b.offset=1" in out
    assert "upstream a" in out and "upstream none" in out  # a reads only raw.txt and code


def test_cli_routes_and_key_prints_the_value(proj, capsys):
    assert cli.main(["lineage", "metrics/b.json", "--key", "fd", "--root", str(proj)]) == 0
    out = capsys.readouterr().out
    assert "(fd = 9.25)" in out.splitlines()[0]  # raw.txt: 4 words * scale 2 = 8; + offset 1; + 0.25
    assert run(proj, key="probe.soda.mean") == 0
    assert "probe.soda.mean = 0.5" in capsys.readouterr().out


def test_json_output_parses(proj, capsys):
    assert run(proj, key="fd", as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["intact"] is True and doc["broken"] == []
    assert [l["stage"] for l in doc["chain"]] == ["b", "a"]
    assert doc["value"] == doc["chain"][0]["value"]
    a = doc["chain"][1]
    assert {x["path"]: x["status"] for x in a["artifacts"]} == {"raw.txt": "OK", "data/a": "OK"}
    assert a["git"]["commit"] and len(a["git"]["commit"]) == 40


def test_modified_upstream_output_is_a_broken_link(proj, capsys):
    (proj / "data/a/x.txt").write_text("999")
    assert run(proj) == 1
    out = capsys.readouterr().out
    broken = out[out.index("BROKEN LINKS"):]
    assert "b: input data/a/x.txt CHANGED" in broken
    assert "a: output data/a CHANGED" in broken and "modified: x.txt" in broken  # the file inside, too


def test_changed_checkpoint_is_named_with_the_file(proj, capsys):
    ckpt = proj / "models/b/model.pt"
    ckpt.chmod(0o644)  # DVC may leave cached outputs read-only
    ckpt.write_bytes(b"retrained elsewhere")
    (proj / "models/b/extra.pt").write_bytes(b"x")
    assert run(proj) == 1
    out = capsys.readouterr().out
    assert "b: output models/b CHANGED" in out
    assert "modified: model.pt; added: extra.pt" in out and "grid.png" not in out.split("BROKEN LINKS")[1]


def test_changed_source_data_file_is_named(proj, capsys):
    (proj / "raw.txt").write_text("other raw data\n")
    assert run(proj, key="fd") == 1
    out = capsys.readouterr().out
    assert "a: input raw.txt CHANGED" in out
    assert "dep raw.txt" not in out  # dvc status says the same: named once


def test_folder_detail_needs_the_dvc_cache(proj, capsys):
    """Without the .dir listing (cache gc'd, never pulled) the folder is still named, just not its files."""
    shutil.rmtree(proj / ".dvc/cache")
    (proj / "data/a/x.txt").write_text("999")
    assert run(proj) == 1
    out = capsys.readouterr().out
    assert "a: output data/a CHANGED" in out and "modified:" not in out


def test_changed_param_names_the_param_and_both_values(proj, capsys):
    (proj / "params.yaml").write_text(PARAMS.replace("scale: 2", "scale: 3"))
    assert run(proj) == 1
    out = capsys.readouterr().out
    assert "a: param a.scale changed: 2 (dvc.lock) -> 3 (params.yaml)" in out


def test_changed_code_dep_and_tampered_metric(proj, capsys):
    with open(proj / "stage.py", "a") as f:
        f.write("# an edit after the run\n")
    m = json.loads((proj / "metrics/b.json").read_text())
    m["fd"] = 1.0
    (proj / "metrics/b.json").write_text(json.dumps(m))
    assert run(proj) == 1
    out = capsys.readouterr().out
    assert "a: code changed: stage.py modified" in out and "b: code changed: stage.py modified" in out
    assert "b: out metrics/b.json modified since dvc.lock" in out


def test_missing_output_is_named(proj, capsys):
    (proj / "data/b.txt").unlink()
    assert run(proj) == 1
    assert "b: output data/b.txt MISSING" in capsys.readouterr().out


def test_missing_upstream_metrics_file_is_a_finding(proj, capsys):
    (proj / "metrics/a.json").unlink()
    assert run(proj) == 1
    assert "a: metrics file metrics/a.json MISSING" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"fd": 1.0})])
def test_unusable_metrics_file_is_a_usage_error(proj, capsys, content):
    if content is not None:
        (proj / "metrics/c.json").write_text(content)
    assert run(proj, metrics="metrics/c.json") == 2
    assert "metrics/c.json" in capsys.readouterr().err


def test_unknown_key_is_a_usage_error(proj, capsys):
    assert run(proj, key="nope") == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "probe.soda.mean" in err  # lists what is there
