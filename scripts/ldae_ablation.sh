#!/usr/bin/env bash
# The l-DAE ablation (docs/studies/ldae-noise-space.md): where the noise goes (ldae.noise_space: latent | pixel) and how many
# PCA components get it (ldae.pca_dim), on mnist5k and on the procedural shapes, as DVC experiments up to
# the linear_probe stage, where every representation is probed (on mnist5k only ldae and linear_probe re-run;
# shapes re-runs every upstream stage). One at a time in DVC's queue (2 cores), then the table of the
# relevant columns is printed. With seeds and paired tests on mnist5k: scripts/ldae_noise_space.py.
# Run from anywhere inside the repository:
#   scripts/ldae_ablation.sh
#   DIMS="8 16 32" SOURCES="mnist5k" scripts/ldae_ablation.sh
set -euo pipefail
source "$(dirname "$0")/lib/no_args.sh"  # --help, or exit 2 on any argument
cd "$(git rev-parse --show-toplevel)"
SOURCES=${SOURCES:-"mnist5k shapes"}
DIMS=${DIMS:-"4 16"}
export DVC_NO_ANALYTICS=1

for src in $SOURCES; do
  for d in $DIMS; do
    dvc exp run --queue linear_probe -S "data.source=$src" -S "ldae.pca_dim=$d" -n "ldae-$src-latent-d$d"
  done
  dvc exp run --queue linear_probe -S "data.source=$src" -S ldae.noise_space=pixel -n "ldae-$src-pixel"
done
dvc exp run --run-all --jobs 1

dvc queue status || true
dvc exp show --md --no-pager --hide-workspace --precision 4 \
  --drop '.*' \
  --keep 'Experiment|data.source|noise_space|pca_dim|probe_ldae$|knn_ldae$|probe_ldae_random_init$|knn_ldae_random_init$|probe_raw_pixels$|knn_raw_pixels$'
