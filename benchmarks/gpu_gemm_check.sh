#!/usr/bin/env bash
# One device call for the split-K skinny GEMM (kernels/gemm_triton.py, added 2026-12-07, session 11), with
# the fused LoRA's pending checks (gpu_fusion_check.sh), in order of what matters:
#   1. native tests: the GEMM kernel against F.linear; the fused kernels; the CUDA-graph
#      engine against HF + PEFT with the fusion and the skinny GEMM on (the fusion alone passed in session 10);
#   2. the captured batch-32 decode step: fused / grouped LoRA, with cuBLASLt or the kernel;
#   3. the four weight GEMMs of a layer, cuBLASLt against the kernel's configs, and a layer's chain
#      (gpu_skinny_gemm.py).
# Run from the repository root on the device:  bash benchmarks/gpu_gemm_check.sh   (writes under $OUT)
set -u
stages=" ${STAGES:-tests gemm ab} "
out="${OUT:-/tmp/out}"
mkdir -p "$out"
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader
git log --oneline -1

if [[ $stages == *" tests "* ]]; then
{ LORASCOPE_FUSED_LORA_MAX_TOKENS=256 timeout 150 python3 -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_gemm_triton.py tests/kernels/test_fused_triton.py
  echo "kernels: rc $?"
  LORASCOPE_FUSED_LORA_MAX_TOKENS=256 LORASCOPE_SKINNY_GEMM_MAX_TOKENS=128 timeout 150 \
    python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_cuda_graphs.py
  echo "engine, fused+skinny: rc $?"; } > "$out/tests.log" 2>&1
grep -E "rc [0-9]|passed|failed|Error" "$out/tests.log" | head -20
fi

if [[ $stages == *" ab "* ]]; then
timeout 240 python3 benchmarks/gpu_step_ab.py --out "$out/step_ab.json" \
    --variants "${AB_VARIANTS:-lora-grouped,lora-grouped+gemm-skinny,lora-fused+gemm-skinny,lora-fused,lora-grouped}" \
    > "$out/step_ab.log" 2>&1
echo "step_ab rc $?"; grep -oE "\"variant\": \"[a-z+-]*\", (\"decode_ms\": [0-9.]*|\"error\": .{0,160})" "$out/step_ab.log"
fi

if [[ $stages == *" gemm "* ]]; then
PYTHONPATH=src:benchmarks timeout 200 python3 benchmarks/gpu_skinny_gemm.py --out "$out/skinny_gemm.json" \
    --budget-s "${GEMM_BUDGET_S:-140}" > "$out/skinny.log" 2>&1
echo "skinny_gemm rc $?"; grep -E '"per_shape"|"chain_ms"' "$out/skinny.log" | cut -c1-900
fi

# 4. (its own call: STAGES=seed) the c=32 seed cells (N=1 and N=1000 uniform) with the knobs in SEED_ENV, then
#    with the defaults, in one process each; the default SEED_ENV turns the fused LoRA off (grouped kernels),
#    the A/B of session 12's default (fusion for 9..64-token steps):  STAGES=seed SEED_BUDGET_S=200 bash benchmarks/gpu_gemm_check.sh
if [[ $stages == *" seed "* ]]; then
seed_budget="${SEED_BUDGET_S:-200}"
for arm in knobs defaults; do
    envs=""; [[ $arm == knobs ]] && envs="${SEED_ENV:-LORASCOPE_FUSED_LORA_MAX_TOKENS=0}"
    env $envs timeout $((seed_budget + 60)) python3 benchmarks/gpu_seed.py --out "$out/seed_$arm" \
        --budget-s "$seed_budget" --requests-scale 1.5 --only 'main/n1-uniform-c32|main/n1000-uniform-c32' \
        > "$out/seed_$arm.log" 2>&1
    echo "seed ($arm: ${envs:-defaults}) rc $?"; tail -8 "$out/seed_$arm.log"
done
fi
