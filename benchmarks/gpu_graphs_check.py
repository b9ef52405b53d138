"""CUDA-graph decode path: greedy tokens identical to the eager path and to HF transformers + PEFT.

    PYTHONPATH=src python3 benchmarks/gpu_graphs_check.py --out $OUT/graphs_check.json

tiny and tiny-qwen2 in float32 on the GPU (presets draw their random weights on the target device, so
the reference is HF sharing the engine's own tensors, not the CPU engine), a mixed batch (adapters of ranks 8/16 on all modules, base requests,
prompt lengths 5..60 so steps mix prefill chunks and decodes, more requests than max_num_seqs so
batch sizes move across graph buckets). Exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters
from lorascope.reference import hf_model_sharing, reference_generate

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def generate(model: str, adapters: Path, device: str, eager: bool, reqs: list[tuple[list[int], str | None]]) -> tuple[list, dict]:
    llm = LLM(model, adapters, device=device, dtype="float32", max_loras=4, max_cpu_loras=8, max_lora_rank=16,
              max_num_seqs=12, max_num_batched_tokens=96, enforce_eager=eager)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, [a for _, a in reqs])
    info = {"s": time.perf_counter() - start, "graphs": sorted(llm.engine.runner.graphs) if device == "cuda" else []}
    llm.close()
    return [o.token_ids for o in outs], info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    report: dict[str, object] = {}
    ok = True
    for model in ("tiny", "tiny-qwen2"):
        root = Path(tempfile.mkdtemp()) / "a"
        make_adapters(root, model, 6, [8, 16], ALL, seed=4)
        names: list[str | None] = [f"a{i:04d}" for i in range(6)] + [None, None]
        gen = torch.Generator().manual_seed(1)
        reqs = [(torch.randint(0, 250, (5 + (7 * i) % 56,), generator=gen).tolist(), names[i % len(names)])
                for i in range(30)]
        eager, info_e = generate(model, root, "cuda", True, reqs)
        graphs, info_g = generate(model, root, "cuda", False, reqs)
        llm = LLM(model, root, device="cuda", dtype="float32")
        hf = hf_model_sharing(llm.engine.runner.model, "cuda")
        adapters = {n: root / n for n in names if n}
        ref = [r.token_ids for r in reference_generate(hf, adapters, reqs, 24, device="cuda", dtype=torch.float32)]
        llm.close()
        row = {"graphs_equal_eager": graphs == eager, "graphs_equal_hf_peft": graphs == ref,
               "mismatched_vs_hf": [i for i, (a, b) in enumerate(zip(graphs, ref, strict=True)) if a != b],
               "eager_s": info_e["s"], "graphs_s": info_g["s"], "buckets_captured": info_g["graphs"]}
        print(model, row, flush=True)
        report[model] = row
        ok &= row["graphs_equal_eager"] and row["graphs_equal_hf_peft"] and bool(info_g["graphs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
