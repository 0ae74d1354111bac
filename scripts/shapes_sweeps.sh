#!/usr/bin/env bash
# The shapes pipeline's SODA sweeps, queued as DVC experiments (docs/shapes.md#sweeps-queued-not-run):
# bottleneck size (z_dim 24 / 48 / 192 / 768), novel views against auto-encoding (views: same), layer
# modulation against one global z with masking on and off, and up to 4 source views at evaluation.
# Queues only; `dvc queue start -j 1` runs them (hours of CPU). Run from anywhere inside the repository:
#   scripts/shapes_sweeps.sh
set -euo pipefail
source "$(dirname "$0")/lib/no_args.sh"  # --help, or exit 2 on any argument
cd "$(git rev-parse --show-toplevel)"
export DVC_NO_ANALYTICS=1
P=pipelines/shapes/params.yaml
q() { dvc exp run --queue pipelines/shapes/dvc.yaml "$@"; }
for z in 24 48 192 768; do q -n "shapes-z$z" -S "$P:soda.z_dim=$z"; done
q -n shapes-views-same -S "$P:soda.views=same"
q -n shapes-global-mask -S "$P:soda.modulation=global"
q -n shapes-global-nomask -S "$P:soda.modulation=global" -S "$P:soda.mask_rate=0.0"
q -n shapes-layer-nomask -S "$P:soda.mask_rate=0.0"
q -n shapes-k1-4 -S "$P:shapes_eval.source_views=[1,2,3,4]"
dvc queue status
