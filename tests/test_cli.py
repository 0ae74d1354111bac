"""`diffrep stage`: the project's own errors print one line and exit 1; any other error keeps its traceback."""
from __future__ import annotations

import pytest
import torch

from diffrep import cli
from diffrep.data.validate import DataValidationError
from diffrep.io import ArtifactError


def _missing_artifact(cfg, root):
    raise ArtifactError("models/soda/model.pt: not found; run `dvc repro soda`")


def _bad_data(cfg, root):
    raise DataValidationError("data validation failed: 1 of 9 checks")


def _shape_bug(cfg, root):
    torch.zeros(2, 3) @ torch.zeros(2, 3)  # RuntimeError from torch: a bug, not a user error


def _plain_value_error(cfg, root):
    raise ValueError("not one of ours")


@pytest.fixture
def stage(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.setattr(cli, "STAGES", {name: f"test_cli:{name}" for name in
                                        ("_missing_artifact", "_bad_data", "_shape_bug", "_plain_value_error")})

    def run(name, *extra):
        return cli.main(["stage", name, "--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), *extra])

    return run


@pytest.mark.parametrize("name,message", [("_missing_artifact", "models/soda/model.pt: not found"),
                                          ("_bad_data", "data validation failed")])
def test_own_errors_print_one_line_and_exit_1(stage, capsys, name, message):
    assert stage(name) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert err.startswith(f"error in stage {name}: {message}") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name,error", [("_shape_bug", RuntimeError), ("_plain_value_error", ValueError)])
def test_other_errors_keep_their_traceback(stage, name, error):
    with pytest.raises(error):
        stage(name)


def test_traceback_flag_reraises_own_errors(stage):
    with pytest.raises(ArtifactError, match="not found"):
        stage("_missing_artifact", "--traceback")


def test_bad_params_and_unknown_stage_are_usage_errors(stage, tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("seed: 0\nsoda: {z_dimm: 3}\n")
    assert stage("_bad_data") == cli.EXIT_USAGE and "unknown key 'soda.z_dimm'" in capsys.readouterr().err
    assert stage("nope") == cli.EXIT_USAGE and "unknown stage 'nope'" in capsys.readouterr().err
