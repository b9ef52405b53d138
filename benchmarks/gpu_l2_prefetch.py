"""A/B of L2 weight prefetch (kernels/l2_prefetch.py) on the captured steps of a real batch, one CUDA GPU.

    PYTHONPATH=src python3 benchmarks/gpu_l2_prefetch.py --out $OUT/l2_prefetch.json [--batch 32]
        [--specs 'none|o=34|o=34,gate_up=16,down=16,qkv=16;mode=load']

llama-3.1-8b shape, bf16, rank-16 q/v adapters, `--batch` sequences of `--prompt` tokens, each on its own
adapter. Per spec ('none': no prefetch), the graphs are captured afresh by a greedy `generate` of 64
tokens; then every captured bucket's graph is replayed (it keeps the last real step's metadata, so
attention and LoRA do real work): ms per replay. The decode bucket (`--batch` tokens) is the number
that matters. Every spec's tokens must equal the first spec's (prefetch changes no arithmetic).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from gpu_profile_decode import _replay_ms
from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters
from lorascope.kernels.l2_prefetch import L2Prefetcher, parse_spec

DEFAULT_SPECS = "|".join([
    "none", "o=34", "o=34;mode=load", "o=34;mode=prefetch_normal", "o=34;programs=16", "o=34;programs=66",
    "o=20", "gate_up=24", "qkv=24", "down=24", "o=34,gate_up=16,down=16,qkv=16", "o=34,gate_up=24,down=24,qkv=24",
    "o=34,gate_up=8,down=8,qkv=8", "none",
])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=176)
    ap.add_argument("--specs", default=DEFAULT_SPECS)
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
    for spec in args.specs.split("|"):
        runner.model.l2_prefetch = None if spec == "none" else L2Prefetcher(parse_spec(spec), torch.device("cuda"))
        runner.graphs.clear()
        runner._pool = None  # the cleared graphs' pool is gone with them
        outs = llm.generate(prompts, params, names)
        tokens = [o.token_ids for o in outs]
        first_tokens = first_tokens or tokens
        replay = {b: _replay_ms(g.graph, args.replays) for b, g in sorted(runner.graphs.items())}
        row = {"spec": spec, "decode_ms": replay.get(args.batch), "replay_ms": replay, "same_tokens": tokens == first_tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": args.batch, "prompt": args.prompt,
                                    "rows": rows}, indent=1))
    llm.close()


if __name__ == "__main__":
    main()
