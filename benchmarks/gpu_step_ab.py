"""A/B of a runner or kernel switch on the captured steps of a real batch, one CUDA GPU: the LoRA shrink
beside the base GEMM on a second stream (`overlap`, the default) against after it on one stream
(`serial`); or the varlen attention's sequence search and block-table prefetch
(kernels/varlen_attention_triton.py `TUNING`), with the shrink overlapped: `attn-binary` (binary search,
no prefetch: the kernel before 2026-12-06), `attn-vector` (vector search only), `attn-prefetch`
(prefetch only), `attn-both` (both); the other variants run the kernel's default (`TUNING`: vector search, no
prefetch). `lora-fused` / `lora-grouped`: the q/k/v and gate/up LoRA folded into the norm and rotary / SiLU
kernels (model/layers.py `LORA_FUSION`, at most 256 tokens) against the grouped shrink + expand launches; these
two differ in float32 summation order, so their tokens may differ. `gemm-skinny` / `gemm-cublas`: the weight
GEMMs of steps up to 128 tokens through the split-K Triton kernel (model/layers.py `SKINNY_GEMM`,
kernels/gemm_triton.py) against cuBLASLt. A variant may join several with "+": `lora-fused+gemm-skinny`.
A variant whose generate fails is recorded with its error; requests it left in flight can change the
next variant's batches (and so its tokens).

    PYTHONPATH=src python3 benchmarks/gpu_step_ab.py --out $OUT/step_ab.json [--batch 32] [--variants overlap,serial]

llama-3.1-8b shape, bf16, rank-16 q/v adapters, `--batch` sequences of `--prompt` tokens, each on its own
adapter. Per variant, the graphs are captured afresh by a greedy `generate` of 64 tokens; then every
captured bucket's graph is replayed (it keeps the last real step's metadata, so attention and LoRA do
real work): ms per replay. The decode bucket (`--batch` tokens) is the number that matters. Every
variant's tokens must equal the first one's (the switch changes no arithmetic).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import lorascope.kernels.varlen_attention_triton as varlen
import lorascope.model.layers as layers
from gpu_profile_decode import _replay_ms
from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters

DEFAULT_VARIANTS = "overlap,serial,overlap,serial"
ATTN = {
    "attn-binary": {"seq_search": "binary", "prefetch_table": False},
    "attn-vector": {"seq_search": "vector", "prefetch_table": False},
    "attn-prefetch": {"seq_search": "binary", "prefetch_table": True},
    "attn-both": {"seq_search": "vector", "prefetch_table": True},
}
ATTN_DEFAULT = dict(varlen.TUNING)
FUSION_DEFAULT = dict(layers.LORA_FUSION)
LORA = {"lora-fused": {"max_tokens": 256, "min_tokens": 0}, "lora-grouped": {"max_tokens": 0}}
GEMM_DEFAULT = dict(layers.SKINNY_GEMM)
GEMM = {"gemm-skinny": {"max_tokens": 128}, "gemm-cublas": {"max_tokens": 0}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=176)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--replays", type=int, default=50)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp()) / "a"
    make_adapters(root, "llama-3.1-8b", args.batch, 16, ["q_proj", "v_proj"], seed=3, dtype=torch.bfloat16)
    names = sorted(p.name for p in root.iterdir())
    llm = LLM("llama-3.1-8b", root, device="cuda", dtype="bfloat16", max_loras=args.batch, max_lora_rank=16,
              max_num_seqs=args.batch, max_model_len=2048, kv_cache_gb=20, lora_target_modules=("q_proj", "v_proj"),
              max_num_batched_tokens=128)
    runner = llm.engine.runner
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (args.prompt,), generator=gen).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    rows, first_tokens = [], None
    side = torch.cuda.Stream()
    for variant in args.variants.split(","):
        parts = variant.split("+")
        for part in parts:
            if part not in ("overlap", "serial", *ATTN, *LORA, *GEMM):
                raise SystemExit(f"unknown variant {part!r}: overlap, serial or one of {', '.join([*ATTN, *LORA, *GEMM])}")
        runner.side_stream = None if "serial" in parts else side
        varlen.TUNING.update(next((ATTN[p] for p in parts if p in ATTN), ATTN_DEFAULT))
        layers.LORA_FUSION.update(next((LORA[p] for p in parts if p in LORA), FUSION_DEFAULT))
        layers.SKINNY_GEMM.update(next((GEMM[p] for p in parts if p in GEMM), GEMM_DEFAULT))
        runner.graphs.clear()
        runner._pool = None  # the cleared graphs' pool is gone with them
        try:
            outs = llm.generate(prompts, params, names)
        except Exception as e:  # e.g. a kernel config that does not build on this GPU: say so, go on
            row = {"variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        tokens = [o.token_ids for o in outs]
        first_tokens = first_tokens or tokens
        replay = {b: _replay_ms(g.graph, args.replays) for b, g in sorted(runner.graphs.items())}
        row = {"variant": variant, "decode_ms": replay.get(args.batch), "replay_ms": replay, "same_tokens": tokens == first_tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": args.batch, "prompt": args.prompt,
                                    "rows": rows}, indent=1))
    llm.close()


if __name__ == "__main__":
    main()
