"""Benchmarks for diffrep (issue 8): `python -m bench` writes one JSON per run.

What a run measures, all in the same process so the numbers are comparable:
  machine   CPU, cores, torch, threads, CUDA device, git commit (bench.machine)
  matmul    this machine's fp32 matmul rate, the yardstick for every model (bench.machine)
  train     per model: img/s of the real training step, FLOPs per step, share of the matmul rate (bench.train)
  sampling  images/s of SODA reconstruction and UL generation at the default steps (bench.sampling)
  quality   probe accuracy, FD, PSNR, bits/px from a metrics folder, with its commit (bench.quality)
  pipeline  optional: a full `dvc repro` in a fresh clone, per-stage wall time and peak RSS (bench.pipeline)

Results go to bench/results/<UTC timestamp>.json, plus latest.json and latest.md (bench.report).
"""
SCHEMA = "diffrep-bench/1"
