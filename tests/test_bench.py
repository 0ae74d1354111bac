"""bench/ (issue 8): the harness runs in a tiny mode and writes a well-formed JSON; its pieces are right.

The numbers themselves are not checked (this is not a timed test), only that they
exist, are positive and finite, and that shares are taken against this run's matmul rate.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a top-level package of the repository, not part of diffrep

from bench.pipeline import dag_order, run_measured, run_pipeline  # noqa: E402
from bench.quality import read_quality  # noqa: E402
from bench.train import CPU_SDPA, share  # noqa: E402

TINY = ["--threads", "1", "--models", "soda", "--steps", "2", "--warmup", "1", "--sample-n", "4",
        "--sample-steps", "2", "--matmul-sizes", "256", "--matmul-reps", "2", "--profile", "soda",
        "--profile-steps", "1", "--no-cuda", "--set", "soda.train.batch_size=16"]  # a quarter of the default step


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_run_writes_the_schema(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "soda.json").write_text(json.dumps(
        {"recon_ssim": 0.9, "recon_psnr": 17.0, "lineage": {"git": {"commit": "abc123", "dirty": False}}}))
    out = tmp_path / "results"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench", *TINY, "--out", str(out), "--from-metrics", str(metrics)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[bench] train soda:" in proc.stderr  # progress output
    runs = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(runs) == 1 and (out / "latest.md").is_file() and list(out.glob("profile-soda-*.txt"))
    run = json.loads(runs[0].read_text())
    assert run == json.loads((out / "latest.json").read_text())
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporary file

    for key in ("schema", "created", "machine", "matmul", "train", "sampling", "quality", "pipeline", "profiles"):
        assert key in run, key
    m = run["machine"]
    assert m["threads"] == 1 and m["cores"] >= 1 and m["torch"] == torch.__version__ and m["cpu_model"]
    assert m["cuda_available"] == torch.cuda.is_available() and "commit" in m["git"] and "dirty" in m["git"]
    mm = run["matmul"]
    assert mm["device"] == "cpu" and mm["dtype"] == "float32" and mm["threads"] == 1 and _positive(mm["gflops"])

    (t,) = run["train"]
    assert t["model"] == "soda" and t["device"] == "cpu" and t["item_shape"] == [1, 16, 16] and t["batch_size"] == 16
    for k in ("img_per_s", "step_ms_median", "flops_per_step", "mflop_per_image", "gflops", "share_of_matmul",
              "n_params"):
        assert _positive(t[k]), (k, t[k])
    # the share is against the matmul rate measured in this same run
    assert t["matmul_gflops"] == mm["gflops"]
    assert t["share_of_matmul"] == pytest.approx(t["gflops"] / mm["gflops"], rel=1e-3)
    assert t["gflops"] == pytest.approx(t["flops_per_step"] * t["steps"] / t["wall_s"] / 1e9, rel=1e-3)

    assert {s["what"] for s in run["sampling"]} == {"soda_reconstruct", "ul_generate"}
    assert all(_positive(s["img_per_s"]) for s in run["sampling"])
    assert run["profiles"][0]["model"] == "soda" and run["profiles"][0]["top"]
    q = run["quality"]["files"]["soda"]
    assert q["commit"] == "abc123" and q["values"] == {"recon_ssim": 0.9, "recon_psnr": 17.0}
    assert "ul_stage1" in run["quality"]["missing"] and run["pipeline"] is None


def test_share_and_cpu_attention_flops():
    assert share(10.0, 40.0) == 0.25 and share(1.0, 0.0) == 0.0
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 16, 8)  # (batch, heads, tokens, head dim)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 2 * (2 * 1 * 2 * 16 * 16 * 8)  # QK^T and PV, 2 FLOPs per multiply-add


def test_dag_order_of_the_real_pipeline():
    order = dag_order(ROOT / "dvc.yaml")
    assert order[0] == "prepare" and order[-1] == "report"
    assert order.index("ul_stage1") < order.index("ul_stage2") < order.index("generation_eval")
    assert order.index("soda") < order.index("linear_probe")


def test_run_measured_reports_the_child_peak_rss(tmp_path):
    with open(tmp_path / "log", "w") as log:  # a child holding ~64 MiB
        wall, rss, rc = run_measured([sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096])"],
                                     tmp_path, dict(os.environ), log)
    assert rc == 0 and wall > 0 and rss > 60


def test_run_measured_does_not_inherit_this_process_rss(tmp_path):
    ballast = bytearray(300 << 20)  # this process now holds 300 MiB more than the child will
    ballast[::4096] = b"x" * len(ballast[::4096])
    with open(tmp_path / "log", "w") as log:
        _, rss, rc = run_measured([sys.executable, "-c", "pass"], tmp_path, dict(os.environ), log)
    del ballast
    assert rc == 0 and 0 < rss < 100, f"a bare interpreter measured {rss:.0f} MiB: the parent's memory leaked in"


def test_run_measured_passes_the_exit_code(tmp_path):
    with open(tmp_path / "log", "w") as log:
        _, _, rc = run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, dict(os.environ), log)
    assert rc == 3


def test_read_quality_picks_probe_keys(tmp_path):
    (tmp_path / "linear_probe.json").write_text(json.dumps(
        {"probe_soda": 0.95, "knn_soda": 0.93, "probe_raw_pixels": 0.9, "best_baseline": {"linear": "pca"},
         "representations": {}, "lineage": {"git": {"commit": "c0ffee", "dirty": True}}}))
    q = read_quality(tmp_path)
    v = q["files"]["linear_probe"]["values"]
    assert v == {"probe_soda": 0.95, "knn_soda": 0.93, "probe_raw_pixels": 0.9}
    assert q["files"]["linear_probe"]["dirty"] is True and "soda" in q["missing"]


@pytest.mark.slow
def test_pipeline_on_a_toy_repo(tmp_path):
    """The --pipeline machinery (clone, local cache, single-item stages, no-op repro) on two trivial stages."""
    repo = tmp_path / "toy"
    repo.mkdir()
    dvc = str(Path(sys.executable).parent / "dvc")
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site"))
    (repo / "first.py").write_text("open('a.txt', 'w').write('a')\n")
    (repo / "second.py").write_text("import json, pathlib\npathlib.Path('metrics').mkdir(exist_ok=True)\n"
                                    "json.dump({'wall_s': 1.0, 'lineage': {'git': {'commit': 'x'}}},"
                                    " open('metrics/ul_stage2.json', 'w'))\n")
    (repo / "dvc.yaml").write_text("""stages:
  second:
    cmd: python second.py
    deps: [a.txt, second.py]
    metrics: [metrics/ul_stage2.json: {cache: false}]
  first:
    cmd: python first.py
    deps: [first.py]
    outs: [a.txt]
""")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (git + ["init", "-q"], [dvc, "init", "-q"], git + ["add", "-A"], git + ["commit", "-qm", "toy"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    assert dag_order(repo / "dvc.yaml") == ["first", "second"]
    res = run_pipeline(repo, progress=lambda m: None)
    assert res.ok, res
    assert [s.stage for s in res.stages] == ["first", "second"] and all(s.peak_rss_mib > 0 for s in res.stages)
    assert res.noop_repro_s > 0 and res.full_repro_s > 0
    assert res.quality["files"]["ul_stage2"]["values"] == {"wall_s": 1.0}
