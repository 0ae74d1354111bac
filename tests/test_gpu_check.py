"""`make gpu-check` on a CPU: it runs, writes its JSON, and says what it skipped and why."""
from __future__ import annotations

import json
import time

import pytest
import torch

from bench import gpu_check


@pytest.mark.slow
@pytest.mark.scale  # ~30 s on 2 busy cores: `make scale` (and `make gpu-check` itself)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; on a GPU run `make gpu-check` itself")
def test_gpu_check_on_cpu_writes_json_and_names_what_it_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    t = time.perf_counter()
    assert gpu_check.main(["--out", str(out), "--steps", "1"]) == 0
    assert time.perf_counter() - t < 120
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["matmul"]["gflops"] > 0
    assert [m["model"] for m in res["models"]] == ["soda", "ul_stage1", "ul_stage2", "ldae"]
    for m in res["models"]:
        assert m["img_per_s"] > 0 and 0 < m["share_of_matmul"] < 5 and m["precision"] == "fp32"
    att = res["attention"]
    assert att["agree"] and att["sdpa"]["max_abs_diff_vs_math"] <= 1e-4
    assert set(res["skipped"]) == {"attention.xformers", "compile", "nccl", "presets"}
    assert all(isinstance(v, str) and v for v in res["skipped"].values())
