"""scripts/shapes_sweep_table.py: finished experiments become rows with intervals; others are listed, not shown."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/shapes_sweep_table.py"
spec = importlib.util.spec_from_file_location("shapes_sweep_table", SCRIPT)
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def commit(root: Path, z_dim: int, psnr: float, d: float) -> str:
    shapes = root / "pipelines/shapes"
    (shapes / "metrics").mkdir(parents=True, exist_ok=True)
    (shapes / "params.yaml").write_text(yaml.safe_dump({"soda": {"z_dim": z_dim, "views": "augment"}}))
    nv = {f"soda_k{k}": {"psnr": psnr + k, "psnr_ci95": [psnr - 1, psnr + 1], "fd": 0.5} for k in (1, 2)}
    scores = {"novel_views": {"methods": nv},
              "dci": {"codes": {"soda": {"disentanglement": d, "disentanglement_ci95": [d - 0.1, d + 0.1],
                                         "completeness": 0.4, "informativeness": 0.5}}}}
    (shapes / "metrics/shapes_eval.json").write_text(json.dumps({"edit_specificity_max": 0.2, "shapes_eval": scores}))
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"z{z_dim}"], cwd=root,
                   check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_rows_name_the_changed_param_and_carry_intervals(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    base = commit(tmp_path, 96, 20.0, 0.6)
    exp = commit(tmp_path, 24, 18.0, 0.7)
    done = {"rev": exp, "name": "shapes-z24", "data": {"rev": exp, "metrics": {"x": {}}}}
    queued = {"rev": base, "name": "shapes-z768", "data": {"rev": base}}  # a queued one: no metrics yet
    running = {"rev": base, "name": "shapes-z48", "data": {"rev": "workspace", "metrics": {"x": {}}}}
    show = [{"rev": "workspace", "experiments": None},
            {"rev": base, "experiments": [{"revs": [done]}, {"revs": [queued]}, {"revs": [running]}]}]
    monkeypatch.chdir(tmp_path)
    lines = sweep.table(show).splitlines()
    base_row = next(x for x in lines if x.startswith(f"| baseline `{base[:7]}`"))
    exp_row = next(x for x in lines if x.startswith("| shapes-z24"))
    assert "(baseline)" in base_row and "21.00 [19.00, 21.00]" in base_row
    assert "`soda.z_dim=24`" in exp_row and "views" not in exp_row  # only what changed names the row
    assert "19.00 [17.00, 19.00]" in exp_row and "0.700 [0.600, 0.800]" in exp_row and "k=2: 20.00" in exp_row
    assert not any(x.startswith(("| shapes-z768", "| shapes-z48")) for x in lines)
    assert any("shapes-z768" in x and "no metrics yet" in x for x in lines)
    assert any("shapes-z48" in x and "no metrics yet" in x for x in lines)


def test_unreadable_input_exits_2(tmp_path, capsys):
    bad = tmp_path / "show.json"
    bad.write_text("{not json")
    assert sweep.main(["--json", str(bad)]) == 2
    assert "could not read the experiments" in capsys.readouterr().err
