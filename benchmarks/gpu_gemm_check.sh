#!/usr/bin/env bash
# One device call for the split-K skinny GEMM (kernels/gemm_triton.py, added 2026-12-07, session 11), with
# the fused LoRA's pending checks (gpu_fusion_check.sh), in order of what matters:
#   1. native tests: the GEMM kernel against F.linear; the fused kernels; the CUDA-graph engine against
#      HF + PEFT with the fusion on, then with the fusion and the skinny GEMM on;
#   2. the four weight GEMMs of a layer, cuBLASLt against the kernel's configs (gpu_skinny_gemm.py);
#   3. the captured batch-32 decode step: fused / grouped LoRA, each with cuBLASLt and with the kernel.
# Run from the repository root on the device:  bash benchmarks/gpu_gemm_check.sh   (writes under $OUT)
set -u
stages=" ${STAGES:-tests gemm ab} "
out="${OUT:-/tmp/out}"
mkdir -p "$out"
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader
git log --oneline -1

if [[ $stages == *" tests "* ]]; then
{ LORASCOPE_FUSED_LORA_MAX_TOKENS=256 timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_gemm_triton.py tests/kernels/test_fused_triton.py tests/engine/test_cuda_graphs.py
  echo "fused: rc $?"
  LORASCOPE_FUSED_LORA_MAX_TOKENS=256 LORASCOPE_SKINNY_GEMM_MAX_TOKENS=128 timeout 150 python3 -m pytest -q -x \
    -p no:cacheprovider tests/engine/test_cuda_graphs.py
  echo "fused+skinny: rc $?"; } > "$out/tests.log" 2>&1
grep -E "rc [0-9]|passed|failed" "$out/tests.log"
fi

if [[ $stages == *" gemm "* ]]; then
PYTHONPATH=src:benchmarks timeout 200 python3 benchmarks/gpu_skinny_gemm.py --out "$out/skinny_gemm.json" \
    --budget-s "${GEMM_BUDGET_S:-140}" > "$out/skinny.log" 2>&1
echo "skinny_gemm rc $?"; grep '"per_shape"' "$out/skinny.log" | cut -c1-900
fi

if [[ $stages == *" ab "* ]]; then
timeout 240 python3 benchmarks/gpu_step_ab.py --out "$out/step_ab.json" \
    --variants lora-fused,lora-grouped,lora-fused+gemm-skinny,lora-grouped+gemm-skinny,lora-fused > "$out/step_ab.log" 2>&1
echo "step_ab rc $?"; grep -o '"variant": "[a-z+-]*", "decode_ms": [0-9.]*' "$out/step_ab.log"
fi
