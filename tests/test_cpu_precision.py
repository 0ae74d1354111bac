"""`runtime.precision: auto` on a CPU (issue 22 point 7): bf16 per stage only where it was measured to pay.

The policy is the table runtime.CPU_BF16 plus the CPU's native bf16 support; a CPU is faked here
(native bf16 or not) so the tests say the same on any machine, CI's Xeons included.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench.models import TRAINED
from diffrep import runtime as rtmod
from diffrep.config import RuntimeConfig, parse_config
from diffrep.runtime import CPU_BF16, cpu_bf16, resolve_runtime

ROOT = Path(__file__).resolve().parents[1]
NATIVE = {"capability": "AVX512", "avx512_bf16": True, "amx_bf16": False, "native_bf16": True}
AMX = {"capability": "AVX512", "avx512_bf16": False, "amx_bf16": True, "native_bf16": True}
PLAIN = {"capability": "AVX2", "avx512_bf16": False, "amx_bf16": False, "native_bf16": False}
CPU = RuntimeConfig(device="cpu")  # precision: auto, the default


@pytest.fixture
def ldae_pays(monkeypatch):
    monkeypatch.setitem(CPU_BF16, "ldae", "+25% img/s (test)")


def test_auto_is_bf16_only_for_a_listed_stage_on_a_cpu_with_native_bf16(ldae_pays):
    for cpu, flag in ((NATIVE, "avx512_bf16"), (AMX, "amx_bf16")):
        rt = resolve_runtime(CPU, "ldae", cpu=cpu)
        assert rt.autocast_dtype is torch.bfloat16 and rt.precision == "bf16"
        assert rt.precision_reason == f"auto: bf16 on cpu ({flag}; ldae pays +25% img/s (test))"
        soda = resolve_runtime(CPU, "soda", cpu=cpu)
        assert soda.autocast_dtype is None and "soda is not in runtime.CPU_BF16" in soda.precision_reason
    plain = resolve_runtime(CPU, "ldae", cpu=PLAIN)
    assert plain.autocast_dtype is None and plain.precision == "fp32"
    assert "no native bf16" in plain.precision_reason
    assert resolve_runtime(CPU, None, cpu=NATIVE).autocast_dtype is None  # no stage named: nothing to look up


def test_fp32_and_bf16_force_whatever_the_cpu_and_stage(ldae_pays):
    for cpu in (NATIVE, PLAIN):
        for stage in ("ldae", "soda", None):
            assert resolve_runtime(RuntimeConfig(device="cpu", precision="fp32"), stage, cpu=cpu).autocast_dtype is None
            forced = resolve_runtime(RuntimeConfig(device="cpu", precision="bf16"), stage, cpu=cpu)
            assert forced.autocast_dtype is torch.bfloat16 and forced.precision_reason == "forced: runtime.precision is bf16"


def test_without_native_bf16_every_stage_trains_in_fp32_as_before():
    """The declared table, as committed: a CPU without native bf16 never changes precision."""
    for stage in (*TRAINED, "linear_probe", "generation_eval"):
        assert resolve_runtime(CPU, stage, cpu=PLAIN).autocast_dtype is None


def test_the_declared_table_on_a_native_bf16_cpu():
    """As committed (docs/studies/cpu-precision.md): only UL stage 2 paid and held its quality."""
    got = {stage: resolve_runtime(CPU, stage, cpu=NATIVE).precision for stage in TRAINED}
    assert got == {"soda": "fp32", "ul_stage1": "fp32", "ul_stage2": "bf16", "ldae": "fp32", "feature_net": "fp32"}


def test_the_declared_table_is_backed_by_the_benchmark():
    """Every stage in CPU_BF16 paid in the committed `python -m bench.cpu_precision` run, on a native-bf16 CPU."""
    res = json.loads((ROOT / "bench/results/cpu_precision.json").read_text())
    assert res["cpu_bf16"]["native_bf16"], "the table must be measured where bf16 is native"
    rows = {r["model"]: r for r in res["models"]}
    assert set(rows) == set(TRAINED)
    for stage in CPU_BF16:
        assert rows[stage]["pays"] and rows[stage]["speedup"] >= 0.10, stage


def test_cpu_bf16_reads_this_machine():
    cap = cpu_bf16()
    assert cap["capability"] == torch.backends.cpu.get_cpu_capability()
    assert cap["native_bf16"] == (cap["avx512_bf16"] or cap["amx_bf16"])


def _feature_net(root: Path, monkeypatch, cpu: dict, precision: str = "auto") -> tuple[dict, dict]:
    from diffrep.stages import feature_net

    monkeypatch.setattr(rtmod, "cpu_bf16", lambda: cpu)
    cfg = parse_config({"data": {"source": "digits", "image_size": 8}, "runtime": {"device": "cpu", "precision": precision},
                        "feature_net": {"width": 8, "train": {"steps": 3, "batch_size": 32, "ckpt_every": 100,
                                                              "log_every": 1}}}, "test")
    metrics = feature_net.run(cfg, root)
    state = torch.load(root / "models/feature_net/model.pt", weights_only=True, map_location="cpu")["state_dict"]
    return metrics, state


def test_a_stage_records_its_precision_and_auto_without_native_bf16_is_bit_identical_to_fp32(
        prepared_digits, tmp_path, monkeypatch):
    monkeypatch.setitem(CPU_BF16, "feature_net", "+30% img/s (test)")
    roots = {}
    for name in ("fp32", "plain", "native"):
        roots[name] = tmp_path / name
        shutil.copytree(prepared_digits[0] / "data", roots[name] / "data")
    m32, s32 = _feature_net(roots["fp32"], monkeypatch, NATIVE, "fp32")
    plain, s_plain = _feature_net(roots["plain"], monkeypatch, PLAIN)
    native, s_native = _feature_net(roots["native"], monkeypatch, NATIVE)
    assert m32["lineage"]["precision"]["training"] == "fp32"
    assert m32["lineage"]["precision"]["reason"] == "forced: runtime.precision is fp32"
    assert plain["lineage"]["precision"]["training"] == "fp32" and "no native bf16" in plain["lineage"]["precision"]["reason"]
    assert native["lineage"]["precision"]["training"] == "bf16"
    assert native["lineage"]["precision"]["reason"] == "auto: bf16 on cpu (avx512_bf16; feature_net pays +30% img/s (test))"
    assert native["lineage"]["precision"]["evaluation"].startswith("fp32")
    assert json.loads((roots["native"] / "metrics/feature_net.json").read_text())["lineage"]["precision"] == \
        native["lineage"]["precision"]  # written to metrics/, not only returned
    weights = [k for k in s32 if torch.is_floating_point(s32[k])]
    assert all(torch.equal(s32[k], s_plain[k]) for k in s32)  # auto on a CPU without native bf16 == fp32, bit for bit
    assert not all(torch.equal(s32[k], s_native[k]) for k in weights)  # and bf16 really trained differently
    assert plain["final_loss"] == m32["final_loss"] != native["final_loss"]


def test_the_benchmark_interleaves_both_arms_and_applies_its_rule(tmp_path):
    from bench import cpu_precision

    res = cpu_precision.run(["feature_net"], blocks=2, steps=1, warmup=0, threads=1, params=ROOT / "params.yaml")
    (row,) = res["models"]
    assert res["cpu_bf16"] == cpu_bf16() and res["machine"]["threads"] == 1
    for clock in ("wall", "cpu"):
        c = row[clock]
        assert len(c["blocks"]["fp32"]) == len(c["blocks"]["bf16"]) == 2
        ratios = sorted(b / a for a, b in zip(c["blocks"]["fp32"], c["blocks"]["bf16"]))
        assert c["ratio_median"] == pytest.approx(sum(ratios) / 2, rel=1e-3)  # median of two = their mean
        assert c["ratio_q1"] == pytest.approx(ratios[0] + 0.25 * (ratios[1] - ratios[0]), rel=1e-3)
    dec = row[cpu_precision.CLOCK]
    assert row["speedup"] == pytest.approx(dec["ratio_median"] - 1, abs=1e-4)
    assert row["pays"] == (row["speedup"] >= cpu_precision.PAYS and dec["ratio_q1"] > 1)
    assert row["loss_after"]["fp32"] != row["loss_after"]["bf16"]  # the bf16 arm really ran in bf16


def test_resume_fingerprint_names_the_training_precision(tmp_path):
    """A checkpoint written in fp32 is never resumed in bf16 (or back) when `auto` resolves differently."""
    from types import SimpleNamespace

    import torch

    from diffrep.stages.runner import fingerprint

    def ctx(dtype):
        return SimpleNamespace(name="ldae", cfg=SimpleNamespace(seed=0), runtime=SimpleNamespace(autocast_dtype=dtype))

    fp32, bf16 = fingerprint(ctx(None), {"a": 1}, []), fingerprint(ctx(torch.bfloat16), {"a": 1}, [])
    assert fp32 != bf16 and fp32 == fingerprint(ctx(None), {"a": 1}, [])
