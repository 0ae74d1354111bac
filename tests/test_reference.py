"""FD reference statistics: byte-deterministic files, a round trip, and every bad file refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffrep.eval.reference import load_reference, save_reference
from diffrep.io import ArtifactError, path_hash


def _save(folder, features):
    folder.mkdir()
    return save_reference(folder, features, set_name="test", space="featnet", featnet_hash="abc")


def test_round_trip_is_exact_and_the_files_are_byte_deterministic(tmp_path):
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    m = _save(tmp_path / "a", f)
    _save(tmp_path / "b", f.clone())
    assert path_hash(tmp_path / "a") == path_hash(tmp_path / "b")  # a re-run changes nothing downstream
    got, manifest = load_reference(tmp_path / "a")
    assert torch.equal(got, f) and manifest == m and manifest["n"] == 50 and manifest["dim"] == 4
    mu = np.load(tmp_path / "a/featnet_test_mu.npy")
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)


@pytest.mark.parametrize("damage", ["flip", "delete", "manifest"])
def test_a_damaged_reference_is_refused_by_name(tmp_path, damage):
    _save(tmp_path / "a", torch.randn(20, 3))
    target = tmp_path / "a/featnet_test_sigma.npy"
    if damage == "flip":
        b = target.read_bytes()
        target.write_bytes(b[:-1] + bytes([b[-1] ^ 1]))
    elif damage == "delete":
        target.unlink()
    else:
        (tmp_path / "a/manifest.json").unlink()
    with pytest.raises(ArtifactError, match="sigma.npy|manifest.json") as e:
        load_reference(tmp_path / "a")
    assert "dvc repro fid_reference" in str(e.value)


def test_a_manifest_that_disagrees_with_the_features_is_refused(tmp_path):
    _save(tmp_path / "a", torch.randn(20, 3))
    m = json.loads((tmp_path / "a/manifest.json").read_text())
    m["n"] = 21
    (tmp_path / "a/manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="manifest says"):
        load_reference(tmp_path / "a")
