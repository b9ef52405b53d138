"""The engine's GPU step path, run on the CPU under Triton's interpreter: the same greedy tokens as the
CPU path.

On CUDA the runner sends a step through Triton kernels only: varlen paged attention for every sequence
(kernels/varlen_attention_triton.py), the fused norm / rotary+KV / SiLU kernels (kernels/fused_triton.py)
and the grouped LoRA kernels (kernels/lora_triton.py). This test flips those switches on a CPU engine
and runs it in a subprocess with TRITON_INTERPRET=1, so CI (no GPU) checks that path end to end with
mixed batches: prefill chunks beside decode tokens, base requests, several adapters of mixed ranks and
targets, fewer slots than adapters. The CPU path is the one tests/engine/test_correctness.py holds to
HF transformers + PEFT. (CUDA graphs themselves: tests/engine/test_cuda_graphs.py, GPU only.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorascope.kernels.fused_triton import HAS_TRITON

SCRIPT = r"""
import json, sys
import torch
from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters

from pathlib import Path
import lorascope.model.layers as layers
model, root = sys.argv[1], Path(sys.argv[2])
layers.LORA_FUSION.update(max_tokens=int(sys.argv[3]), min_tokens=0)  # q/k/v, gate/up LoRA fused into the norm/rotary/SiLU kernels
names = [p.name for p in make_adapters(root, model, 4, [8, 16], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj"], seed=5)] + [None]
gen = torch.Generator().manual_seed(2)
reqs = [(torch.randint(0, 250, (3 + (11 * i) % 40,), generator=gen).tolist(), names[i % len(names)]) for i in range(10)]
params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
out = {}
for gpu_path in (False, True):
    llm = LLM(model, root, device="cpu", dtype="float32", max_loras=3, max_cpu_loras=5, max_num_seqs=6,
              max_num_batched_tokens=48)
    runner = llm.engine.runner
    runner.use_triton = gpu_path
    runner.model.fused = gpu_path
    out[str(gpu_path)] = [o.token_ids for o in llm.generate([p for p, _ in reqs], params, [a for _, a in reqs])]
    llm.close()
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter)")
@pytest.mark.parametrize("model,fused_lora", [("tiny", 256), ("tiny-qwen2", 256), ("tiny", 0)])
def test_gpu_step_path_under_the_interpreter_matches_the_cpu_path(tmp_path: Path, model: str, fused_lora: int) -> None:
    """fused_lora: layers.LORA_FUSION's max_tokens (256: every step here folds the q/k/v and gate/up LoRA into
    the fused kernels; 0: the grouped LoRA kernels everywhere)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, model, str(tmp_path / "adapters"), str(fused_lora)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    cpu, gpu = out["False"], out["True"]
    assert len(cpu) == 10 and all(len(t) == 6 for t in cpu)
    assert gpu == cpu
