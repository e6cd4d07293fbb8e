#!/usr/bin/env bash
# Run (or continue: finished cells are skipped) the CPU stability study, then render its
# reports. JOBS=n sets the worker processes (default 2, one per core of the study
# machine); OUT=dir the parent of the sweep directories (default runs).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-2} out=${OUT:-runs}
sfedlora sweep configs/cpu-study/stability.yaml --name cpu-study --jobs "$jobs" --set "output_dir=$out"
sfedlora sweep configs/cpu-study/adapter-only.yaml --name cpu-study-adapter-only --jobs "$jobs" --set "output_dir=$out"
sfedlora report "$out/cpu-study"
sfedlora report "$out/cpu-study-adapter-only"
