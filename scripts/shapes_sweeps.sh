#!/usr/bin/env bash
# Queue the shapes pipeline's SODA sweeps as DVC experiments (docs/shapes.md#sweeps-queued-not-run).
# Queues only; `dvc queue start -j 1` runs them (hours of CPU). Run from the repository root.
set -euo pipefail
P=pipelines/shapes/params.yaml
q() { dvc exp run --queue pipelines/shapes/dvc.yaml "$@"; }
for z in 24 48 192 768; do q -n "shapes-z$z" -S "$P:soda.z_dim=$z"; done
q -n shapes-views-same -S "$P:soda.views=same"
q -n shapes-global-mask -S "$P:soda.modulation=global"
q -n shapes-global-nomask -S "$P:soda.modulation=global" -S "$P:soda.mask_rate=0.0"
q -n shapes-layer-nomask -S "$P:soda.mask_rate=0.0"
q -n shapes-k1-4 -S "$P:shapes_eval.source_views=[1,2,3,4]"
dvc queue status
