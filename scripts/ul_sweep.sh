#!/usr/bin/env bash
# The Unified Latents trade-off (docs/studies/ul-tradeoff.md), as DVC experiments of the ul_stage1 stage only:
#   - ul.stage1.loss_factor over FACTORS: bits/px and reconstruction PSNR both rise with it;
#   - ul.stage1.logsnr_z0=10 (at the default loss factor): reconstructions degrade; the paper's bitrate
#     collapse did not reproduce at 16x16 (docs/studies/ul-tradeoff.md: the encoder shrinks its latent instead).
# Each experiment runs `prepare` (cached) and `ul_stage1` in DVC's queue, one at a time (2 cores), then the
# table of the relevant columns is printed. Run from anywhere inside the repository:
#   scripts/ul_sweep.sh                   # default factors
#   FACTORS="1.0 2.0 4.0" scripts/ul_sweep.sh
set -euo pipefail
source "$(dirname "$0")/lib/no_args.sh"  # --help, or exit 2 on any argument
cd "$(git rev-parse --show-toplevel)"
FACTORS=${FACTORS:-"1.5 3.0 6.0"}
export DVC_NO_ANALYTICS=1

for lf in $FACTORS; do
  dvc exp run --queue ul_stage1 -S "ul.stage1.loss_factor=$lf" -n "ul-lf-${lf/./p}"
done
dvc exp run --queue ul_stage1 -S ul.stage1.logsnr_z0=10 -n "ul-z0-10"
dvc exp run --run-all --jobs 1

# Experiments that failed stay in the queue's failed list: show them rather than a silently short table.
dvc queue status || true
# Markdown: never truncated to the terminal's width, and ready for docs/studies/. --only-changed hides the
# other stages' metrics (the sweep leaves them untouched).
dvc exp show --md --no-pager --only-changed --hide-workspace --precision 4 \
  --drop '.*' \
  --keep 'Experiment|loss_factor|logsnr_z0|bits_per_pixel|recon_psnr|recon_ssim|images_per_s'
