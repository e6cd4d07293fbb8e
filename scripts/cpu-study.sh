#!/usr/bin/env bash
# Run (or continue: finished cells are skipped) the CPU stability study, then render its
# reports. JOBS=n sets the worker processes (default 2, one per core of the study
# machine); OUT=dir the parent of the sweep directories (default runs).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-2} out=${OUT:-runs}
# The paper's hardest corner (N = 20, r = 512) first, so it is measured even if the grid is
# stopped early; these are cells of the full grid, which then skips them.
sfedlora sweep configs/cpu-study/stability.yaml --name cpu-study --jobs "$jobs" --set "output_dir=$out" --grid "clients=20 rank=512"
sfedlora sweep configs/cpu-study/stability.yaml --name cpu-study --jobs "$jobs" --set "output_dir=$out"
sfedlora sweep configs/cpu-study/adapter-only.yaml --name cpu-study-adapter-only --jobs "$jobs" --set "output_dir=$out"
# Each sweep's record (every finished run's config, metrics and summary) is what
# docs/results/cpu-study/ keeps of it: its tables and figures regenerate from the record.
sfedlora report "$out/cpu-study" --record "$out/cpu-study/record.json.gz"
sfedlora report "$out/cpu-study-adapter-only" --record "$out/cpu-study-adapter-only/record.json.gz"
