#!/usr/bin/env bash
# What a CUDA GPU can check that CI (no GPU) cannot, in one run of about 9 minutes on an H200 (under the
# 10-minute limit of one device call), from the repo root:
#   1. tests/gpu: the Triton kernels compiled for the device against the unfused ops, and every runnable
#      tiny spec's program on one GPU (NCCL, Triton kernels) against the eager reference;
#   2. bench/kernels.py at paper sizes with --check (ties: 1.4e-4 of tucker_topk's rows on an H200), float32
#      then bfloat16 (the kernels that do not select slots: ties, tests/gpu/test_cuda.py): each kernel's
#      speed as a fraction of HBM bandwidth;
#   3. bench/step_time_gpu.py: three ~100M specs' measured step times beside the plans', the GPU calibrated
#      as one device (`ultraplan calibrate --nproc 1 --links-from h200-8`) and the h200-8 datasheet's;
#      FULL=1 adds the other three specs and a run of each with torch's kernels (about 10 minutes more).
# Usage: bash tools/gpu_check.sh [OUT_DIR]   (default out/gpu; gpu_check.log and each stage's JSON land there)
# PYTHON picks the interpreter (default python3); ultraplan must be importable by it (pip install -e .).
# Each stage has its own time limit and a failed stage does not stop the next; the exit status is the
# number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
failed=0
log=$out/gpu_check.log
: >"$log"
stage() {  # stage NAME SECONDS COMMAND...: run it with a limit, its output here and appended to $log
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), at most ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code ($(date -u +%H:%M:%S))" | tee -a "$log"
  [ "$code" = 0 ] || failed=$((failed + 1))
}
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
stage machine 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv && \
  $py -c \"import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)\""
stage tests 150 $py -m pytest tests/gpu -q -n 8 -p no:cacheprovider
stage kernels_fp32 60 $py bench/kernels.py --check --slot-rows 0.001 --json-out "$out/kernels_fp32.json"
stage kernels_bf16 45 $py bench/kernels.py --check --dtype bfloat16 --json-out "$out/kernels_bf16.json" \
  --kernels gather_weighted_sum,gather_row_dot,gather_core_pool,gather_ive_pool,add_rms_norm,pk_slot_scores
stage step_time 330 $py bench/step_time_gpu.py --calibrate --kernels triton --steps 12 --json-out "$out/step_time.json" \
  --specs dense-100m moe-100m ultramem-v2-100m
if [ "${FULL:-0}" = 1 ]; then
  stage step_time_rest 330 $py bench/step_time_gpu.py --calibrate --kernels triton --steps 12 \
    --specs pkm-100m peer-100m ultramem-100m --json-out "$out/step_time_rest.json"
  stage step_time_torch 300 $py bench/step_time_gpu.py --kernels torch --batches 64 --steps 12 \
    --json-out "$out/step_time_torch.json"
fi
echo "gpu_check: $failed stage(s) failed"
exit "$failed"
