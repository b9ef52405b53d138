"""Where the GPU time of one captured decode step goes: a kernel-level profile of CUDA-graph replays.

    PYTHONPATH=src python3 benchmarks/gpu_profile_decode.py --out $OUT/profile.json [--batch 32] [--adapters 32]
        [--no-packed]

llama-3.1-8b shape, bf16, rank-16 q/v adapters; one closed batch captures the bucket, then 10 replays
of that bucket's graph run under torch.profiler. Prints the kernels grouped by name (total time per
step, launches per step), the step's kernel count and the time in weight GEMMs (cuBLAS kernels, the LM
head included), and writes them as JSON. `--packed` (the default) runs q/k/v and gate/up as one GEMM
each (Decoder.pack_projections: 4 weight GEMMs per layer), `--no-packed` as one per linear (7).

`--token-buckets 32,64,160` also times, per bucket, the replay of a graph captured with padding only
(no sequence: attention and LoRA find no work, so it is the weight GEMMs and the elementwise kernels at
M = bucket rows): what a step's size costs apart from its attention and adapters.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                    help="q/k/v and gate/up as one GEMM each (default); --no-packed: one GEMM per linear")
    ap.add_argument("--token-buckets", default="", help="comma list: padding-only graph replay ms per bucket")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp()) / "a"
    make_adapters(root, "llama-3.1-8b", max(1, args.adapters), 16, ["q_proj", "v_proj"], seed=3, dtype=torch.bfloat16)
    names = sorted(p.name for p in root.iterdir())[: args.adapters]
    llm = LLM("llama-3.1-8b", root, device="cuda", dtype="bfloat16", max_loras=max(1, args.adapters), max_lora_rank=16,
              max_num_seqs=args.batch, max_model_len=2048, kv_cache_gb=20, lora_target_modules=("q_proj", "v_proj"))
    runner = llm.engine.runner
    # graphs are captured on first use (in generate below); a graph captured before would keep reading
    # the weights it was captured with
    assert not runner.graphs, "graphs captured before the packing was chosen"
    if args.packed:
        runner.model.pack_projections()
    else:
        runner.model.unpack_projections()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (128,), generator=gen).tolist() for _ in range(args.batch)]
    adapter_of = [names[i % len(names)] if names else None for i in range(args.batch)]
    llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), adapter_of)
    graph = runner.graphs[args.batch].graph
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    replay_ms = 1e3 * (time.perf_counter() - t0) / 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            kernels[ev.name].append(ev.device_time_total)
    rows = sorted(({"kernel": k[:120], "us_per_step": sum(v) / args.replays, "launches_per_step": len(v) / args.replays}
                   for k, v in kernels.items()), key=lambda r: -r["us_per_step"])
    total_us = sum(r["us_per_step"] for r in rows)
    launches = sum(r["launches_per_step"] for r in rows)
    gemms = [r for r in rows if _is_gemm(r["kernel"])]
    gemm_us = sum(r["us_per_step"] for r in gemms)
    gemm_launches = sum(r["launches_per_step"] for r in gemms)
    print(f"batch {args.batch}, {args.adapters} adapters, {'packed' if args.packed else 'unpacked'} projections: "
          f"replay {replay_ms:.2f} ms/step (wall), kernel time {total_us / 1e3:.2f} ms/step in {launches:.0f} launches; "
          f"weight GEMMs {gemm_us / 1e3:.2f} ms/step in {gemm_launches:.0f} launches")
    for r in rows[:30]:
        print(f"{r['us_per_step']:9.1f} us {r['launches_per_step']:6.0f}x  {r['kernel']}")
    buckets = {}
    for b in (int(x) for x in args.token_buckets.split(",") if x.strip()):
        if b not in runner.token_buckets:
            print(f"bucket {b} is not one of the runner's {runner.token_buckets}: skipped")
            continue
        pad = runner._capture(b).graph  # padding only (a fresh capture even when the step's bucket had one)
        buckets[b] = _replay_ms(pad, 20)
        print(f"bucket {b:5d} (padding only): replay {buckets[b]:.3f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"padding_only_replay_ms": buckets, "batch": args.batch, "adapters": args.adapters, "packed": args.packed,
                                    "replay_ms": replay_ms, "kernel_ms": total_us / 1e3, "launches": launches,
                                    "gemm_ms": gemm_us / 1e3, "gemm_launches": gemm_launches, "kernels": rows},
                                   indent=2))
    llm.close()


def _replay_ms(graph: torch.cuda.CUDAGraph, n: int) -> float:
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


def _is_gemm(kernel: str) -> bool:
    """cuBLAS's matmul kernels (nvjet on Hopper, older sm90/cutlass names, split-K reductions); the
    Triton kernels (LoRA, attention, fused elementwise) are named after their functions."""
    name = kernel.lower()
    return any(tag in name for tag in ("gemm", "nvjet", "cutlass", "splitkreduce"))


if __name__ == "__main__":
    main()
