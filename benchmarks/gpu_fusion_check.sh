#!/usr/bin/env bash
# One device call that decides the two knobs added on 2026-12-06 (session 9), in order of what matters:
#   1. the fused kernels compile and match the grouped ones natively (tests/kernels/test_fused_triton.py,
#      and the CUDA-graph engine test with the fusion on: its tokens against HF + PEFT in float32);
#   2. the captured batch-32 decode step, fused LoRA against grouped, twice interleaved (gpu_step_ab.py);
#   3. the step's kernels with the fusion on and off (gpu_profile_decode.py), top kernels printed;
#   4. the attention and LoRA kernel variants (gpu_kernel_probe.py: table_in_registers, prefetch_kv, ...);
#   5. the c=32 seed cells (N=1 and N=1000 uniform) with the fusion on, then off, in one process each.
# Run from the repository root on the device:  bash benchmarks/gpu_fusion_check.sh   (writes under $OUT)
# One device command runs at most 10 minutes, so the stages (tests ab profile probe seed) can be split over calls:
#   STAGES="tests ab profile" bash benchmarks/gpu_fusion_check.sh (~4 min);  STAGES=seed SEED_BUDGET_S=200 bash ...
set -u
stages=" ${STAGES:-tests ab profile probe seed} "
seed_budget="${SEED_BUDGET_S:-240}"
out="${OUT:-/tmp/out}"
mkdir -p "$out"
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader
git log --oneline -1

if [[ $stages == *" tests "* ]]; then
LORASCOPE_FUSED_LORA_MAX_TOKENS=256 timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_fused_triton.py tests/engine/test_cuda_graphs.py > "$out/tests.log" 2>&1
echo "tests rc $?"; tail -2 "$out/tests.log"
fi

if [[ $stages == *" ab "* ]]; then
timeout 300 python3 benchmarks/gpu_step_ab.py --out "$out/step_ab.json" \
    --variants lora-fused,lora-grouped,lora-fused,lora-grouped > "$out/step_ab.log" 2>&1
echo "step_ab rc $?"; grep -o '"variant": "[a-z-]*", "decode_ms": [0-9.]*' "$out/step_ab.log"
fi

if [[ $stages == *" profile "* ]]; then
for fused in 256 0; do
    LORASCOPE_FUSED_LORA_MAX_TOKENS=$fused timeout 120 python3 benchmarks/gpu_profile_decode.py \
        --out "$out/profile_fused$fused.json" > /dev/null 2>&1
    echo "profile (fused max_tokens $fused) rc $?"
    python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print({k: v for k, v in d.items() if not isinstance(v, list)})
for r in d['kernels'][:9]: print(round(r['us_per_step'], 1), r['launches_per_step'], r['kernel'][:70])" \
        "$out/profile_fused$fused.json"
done
fi

if [[ $stages == *" probe "* ]]; then
timeout 240 python3 benchmarks/gpu_kernel_probe.py --out "$out/probe.json" > "$out/probe.log" 2>&1
echo "probe rc $?"; grep -o '"kernel".*"us_per_call": [0-9.]*' "$out/probe.log" | cut -c1-160
fi

if [[ $stages == *" seed "* ]]; then
for fused in 256 0; do
    LORASCOPE_FUSED_LORA_MAX_TOKENS=$fused timeout $((seed_budget + 60)) python3 benchmarks/gpu_seed.py --out "$out/seed_fused$fused" \
        --budget-s "$seed_budget" --requests-scale 1.5 --only 'main/n1-uniform-c32|main/n1000-uniform-c32' \
        > "$out/seed_fused$fused.log" 2>&1
    echo "seed (fused max_tokens $fused) rc $?"; tail -8 "$out/seed_fused$fused.log"
done
fi
