#!/usr/bin/env bash
# The prepared command for a lent GPU machine (README "On a GPU"): installs the offline bundle that
# bench/device_bundle.py made (default .whl/bundle, carried with the working tree), then runs the whole job per
# family (bench/gpu_job.py) and the GPU check with its speed levers (bench/gpu_check.py), JSON and logs into $OUT.
#   bash bench/device_run.sh [BUNDLE] [FAMILIES] [JOB_BUDGET_S] [CHECK_BUDGET_S]
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-.whl/bundle} families=${2:-sd3,flux} job_s=${3:-340} check_s=${4:-200}
out=${OUT:-runs/device}
mkdir -p "$out"
site=$(mktemp -d)/site
PYTHON=${PYTHON:-python} sh "$bundle/install.sh" "$site" > "$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
"${PYTHON:-python}" bench/gpu_job.py --families "$families" --budget-s "$job_s" --out "$(mktemp -d)" \
    --json "$out/gpu_job.json" > "$out/gpu_job.log" 2>&1
echo "gpu_job exit $?"; grep -A40 '^\[gpu_job\] .*torch' "$out/gpu_job.log"
"${PYTHON:-python}" bench/gpu_check.py --families "$families" --budget-s "$check_s" --json "$out/gpu_check.json" \
    > "$out/gpu_check.log" 2>&1
echo "gpu_check exit $?"; grep '^|' "$out/gpu_check.log"
