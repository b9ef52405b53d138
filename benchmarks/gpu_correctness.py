"""On one CUDA GPU, the `llama-3.1-8b` shape (random weights): the embedded engine against HF
transformers + PEFT on the very same weight tensors and adapter files.

1. float32: greedy tokens identical to HF + PEFT for every request of one mixed batch (adapters
   of ranks 8 and 16, all-linear and q/v targets, plus base-model requests), >= 32 tokens.
2. bfloat16 (the same weights, rounded): logits within 2e-2 relative of the float32 run, compared
   step by step up to the first token where the two runs part (reported).
3. A first speed reading of the plain-torch engine (bf16, 128 prompt + 128 output tokens, c=32),
   as the baseline the Triton work of a later issue starts from.

    python benchmarks/gpu_correctness.py --out $OUT/gpu_correctness.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters
from lorascope.reference import hf_model_sharing, reference_generate

MODEL = "llama-3.1-8b"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_engine(dtype: str, adapters: dict[str, Path], reqs, tokens: int) -> tuple[LLM, list, float]:
    start = time.perf_counter()
    llm = LLM(MODEL, adapters, device="cuda", dtype=dtype, max_loras=len(adapters), max_lora_rank=16,
              max_num_seqs=16, max_model_len=2048, kv_cache_gb=2)
    build_s = time.perf_counter() - start
    llm.engine.preload(sorted(adapters))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, return_logits=True)
    outs = llm.generate([p for p, _ in reqs], params, [a for _, a in reqs])
    return llm, outs, build_s


def speed(adapters_root: Path, n_adapters: int, requests: int = 64) -> dict[str, float]:
    names = sorted(p.name for p in adapters_root.iterdir())[:n_adapters]
    llm = LLM(MODEL, {n: adapters_root / n for n in names}, device="cuda", dtype="bfloat16", max_loras=32,
              max_cpu_loras=64, max_lora_rank=16, max_num_seqs=32, max_model_len=2048, kv_cache_gb=8,
              lora_target_modules=("q_proj", "v_proj"))
    eng = llm.engine
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (128,), generator=gen).tolist() for _ in range(requests + 32)]
    adapter_of = [names[i % len(names)] if names else None for i in range(len(prompts))]
    # warm-up: one full batch, untimed
    llm.generate(prompts[:32], params, adapter_of[:32])
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts[32:], params, adapter_of[32:])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    steps = list(eng.steps)[-200:]
    result = {"adapters": n_adapters, "tok_s": tokens / elapsed, "elapsed_s": elapsed,
              "mean_step_ms": 1e3 * sum(s.duration_s for s in steps) / len(steps)}
    llm.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import peft
    import transformers

    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "transformers": transformers.__version__, "peft": peft.__version__}
    print(report, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="lorascope-gpu-"))
    t0 = time.perf_counter()
    every = make_adapters(tmp / "all", MODEL, 2, [8, 16], ALL, seed=1)
    qv = make_adapters(tmp / "qv", MODEL, 2, [16, 8], ["q_proj", "v_proj"], seed=2)
    adapters = {f"all-{p.name}": p for p in every} | {f"qv-{p.name}": p for p in qv}
    report["adapters_make_s"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    names: list[str | None] = [*sorted(adapters), None, None]
    reqs = [(torch.randint(0, 128000, (8 + 9 * i,), generator=gen).tolist(), name) for i, name in enumerate(names)]

    llm32, outs32, build32 = run_engine("float32", adapters, reqs, args.tokens)
    first = llm32.engine.steps[0]
    report["fp32"] = {"build_s": build32, "first_step_seqs": first.num_seqs, "first_step_adapters": first.num_adapters}
    start = time.perf_counter()
    hf = hf_model_sharing(llm32.engine.runner.model, "cuda")
    ref = reference_generate(hf, adapters, reqs, args.tokens, device="cuda", dtype=torch.float32)
    report["fp32"]["reference_s"] = time.perf_counter() - start
    rows = []
    for (prompt, name), ours, want in zip(reqs, outs32, ref, strict=True):
        rows.append({"adapter": name, "prompt_len": len(prompt), "tokens_equal": ours.token_ids == want.token_ids,
                     "logits_rel": rel(torch.stack(ours.logits), want.logits), "min_margin": min(want.margins)})
    report["fp32"]["requests"] = rows
    report["fp32"]["all_tokens_equal"] = all(r["tokens_equal"] for r in rows)
    logits32 = [torch.stack(o.logits) for o in outs32]
    tokens32 = [o.token_ids for o in outs32]
    del hf, ref, outs32
    llm32.close()
    del llm32
    gc.collect()
    torch.cuda.empty_cache()

    llm16, outs16, build16 = run_engine("bfloat16", adapters, reqs, args.tokens)
    rows = []
    for (_, name), o16, l32, t32 in zip(reqs, outs16, logits32, tokens32, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(o16.token_ids, t32, strict=True)) if a != b), len(t32))
        upto = min(same + 1, len(t32))  # the step where they part is still fed identical prefixes
        rows.append({"adapter": name, "steps_compared": upto, "first_divergence": same if same < len(t32) else None,
                     "logits_rel": rel(torch.stack(o16.logits)[:upto], l32[:upto])})
    report["bf16"] = {"build_s": build16, "requests": rows, "max_logits_rel": max(r["logits_rel"] for r in rows)}
    llm16.close()
    del llm16, outs16
    gc.collect()
    torch.cuda.empty_cache()

    speed_root = tmp / "speed"
    make_adapters(speed_root, MODEL, 32, 16, ["q_proj", "v_proj"], seed=3)
    report["speed_plain_torch"] = [speed(speed_root, 0), speed(speed_root, 1), speed(speed_root, 32)]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = report["fp32"]["all_tokens_equal"] and report["bf16"]["max_logits_rel"] <= 2e-2
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
