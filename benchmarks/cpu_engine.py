"""CPU benchmark of the embedded engine: tok/s for `tiny` at concurrency 32, uniform traffic over
N adapters, both policies; and `adapters make` timings. Prints a table and writes JSON.

    python benchmarks/cpu_engine.py [--out benchmarks/out/cpu_engine.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lorascope import SamplingParams
from lorascope.adapters.synthetic import make_adapters
from lorascope.config import EngineConfig
from lorascope.engine.engine import LLMEngine


def closed_loop(engine: LLMEngine, names: list[str], concurrency: int, requests: int, warmup: int,
                prompt_len: int, output_len: int, seed: int = 0) -> dict[str, float]:
    """Keep `concurrency` requests in flight; adapters drawn uniformly. Warm-up requests are excluded."""
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    sent = done = 0
    total = warmup + requests
    in_flight = set()
    measured: set[str] = set()
    t_start = None
    measured_tokens = 0
    while done < total:
        while len(in_flight) < concurrency and sent < total:
            prompt = [rng.randrange(1, 255) for _ in range(prompt_len)]
            req = engine.add_request(prompt, params, rng.choice(names) if names else None)
            if sent >= warmup:
                measured.add(req.request_id)
            if sent == warmup:
                t_start = time.perf_counter()
            in_flight.add(req)
            sent += 1
        for req in engine.step():
            if req.finished:
                in_flight.discard(req)
                done += 1
                if req.request_id in measured:
                    measured_tokens += len(req.output_ids)
    elapsed = time.perf_counter() - t_start
    steps = [s for s in engine.steps if s.start_s >= t_start]
    return {
        "tok_s": measured_tokens / elapsed,
        "elapsed_s": elapsed,
        "steps": len(steps),
        "mean_step_ms": 1e3 * sum(s.duration_s for s in steps) / max(1, len(steps)),
        "mean_active_adapters": sum(s.num_adapters for s in steps) / max(1, len(steps)),
        "mean_batch": sum(s.num_seqs for s in steps) / max(1, len(steps)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/cpu_engine.json"))
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--skip-8b", action="store_true", help="skip the 100 llama-3.1-8b adapters timing")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per cell (the median is reported)")
    ap.add_argument("--adapters", default="0,1,100,1000", help="comma list of N")
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict[str, object] = {"machine": f"{platform.node()} {platform.processor()} {torch.get_num_threads()} threads",
                                  "torch": torch.__version__, "cells": [], "adapters_make": {}}
    tmp = Path(tempfile.mkdtemp(prefix="lorascope-bench-"))
    try:
        start = time.perf_counter()
        make_adapters(tmp / "tiny", "tiny", 1000, 16, ["q_proj", "v_proj"])
        results["adapters_make"]["tiny_1000_r16_qv_s"] = time.perf_counter() - start
        print(f"adapters make: 1000 tiny rank-16 q/v adapters in {results['adapters_make']['tiny_1000_r16_qv_s']:.2f} s")
        if not args.skip_8b:
            start = time.perf_counter()
            make_adapters(tmp / "8b", "llama-3.1-8b", 100, 16, ["q_proj", "v_proj"], dtype=torch.bfloat16)
            secs = time.perf_counter() - start
            size = sum(f.stat().st_size for f in (tmp / "8b").rglob("*.safetensors"))
            results["adapters_make"]["llama8b_100_r16_qv_s"] = secs
            results["adapters_make"]["llama8b_adapter_mb"] = size / 100 / 1e6
            print(f"adapters make: 100 llama-3.1-8b rank-16 q/v bf16 adapters ({size / 100 / 1e6:.1f} MB each) in {secs:.1f} s")
            shutil.rmtree(tmp / "8b")
        all_names = sorted(p.name for p in (tmp / "tiny").iterdir())
        requests, warmup = (64, 32) if args.quick else (512, 64)
        rows = []
        for policy in ("fair", "vllm"):
            for n in map(int, args.adapters.split(",")):
                adapters = {name: tmp / "tiny" / name for name in all_names[:n]}
                cfg = EngineConfig(model="tiny", max_loras=32, max_cpu_loras=max(32, n), max_lora_rank=16,
                                   max_num_seqs=32, policy=policy, lora_target_modules=("q_proj", "v_proj"))
                reps = []
                for rep in range(args.repeat):
                    engine = LLMEngine(cfg, adapters)
                    reps.append(closed_loop(engine, sorted(adapters), 32, requests, warmup, 32, 32, seed=rep))
                    engine.close()
                reps.sort(key=lambda c: c["tok_s"])
                cell = dict(reps[len(reps) // 2])
                cell.update(policy=policy, adapters=n, tok_s_all=[round(c["tok_s"], 1) for c in reps])
                results["cells"].append(cell)
                rows.append(cell)
                print(f"{policy:5s} N={n:5d}  {cell['tok_s']:7.1f} tok/s (runs {cell['tok_s_all']})  step "
                      f"{cell['mean_step_ms']:5.1f} ms  batch {cell['mean_batch']:4.1f}  active {cell['mean_active_adapters']:4.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
