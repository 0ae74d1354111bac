# The README's commands. Each target creates .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Keep every tool's state inside the project and its telemetry off.
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.cache/dvc-site
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export GX_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup pipeline pipeline-shapes test test-shapes faults scale gpu-check bench exps exps-shapes-queue clean-cache help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# One editable install with the dev extra; re-run when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install diffrep with the dev extra

pipeline: setup  ## run the whole DVC pipeline on the embedded default data
	$(BIN)/dvc repro

pipeline-shapes: setup  ## the second pipeline: SODA on 3D shapes (pipelines/shapes; docs/shapes.md)
	$(BIN)/dvc repro pipelines/shapes/dvc.yaml

test: setup  ## run the test suite (all but the slow suites: `make faults`, `make scale`, `make test-shapes`)
	$(BIN)/python -m pytest -q -m "not (slow and faults) and not scale and not shapes_pipeline"

scale: setup  ## the multi-process cases: `dvc repro` with 2 launched DDP workers, two local "nodes", preset steps, gpu-check on CPU (~10 min)
	$(BIN)/python -m pytest -q -m scale tests/test_launch.py tests/test_presets.py tests/test_gpu_check.py

test-shapes: setup  ## the shapes pipeline end to end with tiny params in a temporary repository (~75 s)
	$(BIN)/python -m pytest -q -m shapes_pipeline tests/test_shapes_pipeline.py

faults: setup  ## the slow fault-injection cases (signals, a real full disk, Prefect retries; ~2 min)
	$(BIN)/python -m pytest -q -m slow tests/test_faults_slow.py

gpu-check: setup  ## what this machine's GPU(s) can do: bf16 model FLOP/s, xformers vs SDPA, compile, NCCL, preset memory (bench/results/gpu_check.json)
	$(BIN)/python -m bench.gpu_check

bench: setup  ## run the benchmarks (writes bench/results/*.json); BENCH_ARGS="--pipeline" adds a full dvc repro
	$(BIN)/python -m bench $(BENCH_ARGS)

# DVC shows every key and every param as a column; keep the headline metrics and the params people sweep.
EXPS_KEEP := Experiment|Created|probe_soda$$|probe_ul$$|probe_ldae$$|knn_ldae$$|knn_raw_pixels$$|fd_featnet$$|fd_featnet_above_floor$$|bits_per_pixel$$|metrics/ul_stage1.json:recon_psnr|data.source|ul.stage1.loss_factor|ul.stage1.logsnr_z0|ldae.noise_space|ldae.pca_dim
exps: setup  ## compare DVC experiments (headline columns); EXPS_ARGS="-A" for experiments of every commit
	$(BIN)/dvc exp show --drop '.*' --keep '$(EXPS_KEEP)' $(EXPS_ARGS)

# stdlib only: no venv needed. README_ARGS=--check compares instead of writing (make test runs that check).
.PHONY: readme
readme:  ## re-render README.md's results table from metrics/*.json
	python3 scripts/readme_results.py $(README_ARGS)

exps-shapes-queue: setup  ## queue the shapes pipeline's SODA sweeps as DVC experiments (not run; docs/shapes.md)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/shapes_sweeps.sh

clean-cache:  ## remove resume checkpoints and TensorBoard runs
	rm -rf .cache/checkpoints runs
