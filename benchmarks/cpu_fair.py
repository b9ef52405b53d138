"""CPU benchmark of the embedded engine's admission policies on the study's sweep-C workload, scaled
to the `tiny` model: Zipf 1.5 popularity over N synthetic rank-16 q/v adapters, closed loop at
concurrency C (each finished request is replaced before the next step), prompt P and output O
tokens (ignore_eos). Reports output tok/s over the steady window and TTFT / TPOT percentiles of the
measured requests; the loop keeps sending unmeasured filler requests until every measured one has
finished, so the measured requests never see the concurrency drop.

    python benchmarks/cpu_fair.py [--max-loras 4,8] [--policies vllm,fair] [--repeat 3]
        [--variant before=/path/to/old/src --variant after=src] [--out benchmarks/results/cpu_fair_DATE.json]

`--fake-model` replaces the model step by a stub (every sampled token is 0) and waits for the
adapter loads after each step, so a load takes one step, as a ~0.3 ms pinned copy does beside a
GPU step: a noise-free, step-level run of the scheduler alone. Its tokens per step (`mean_batch`)
stand for throughput where a decode step costs the same whatever its batch (a GPU at c=32: the
weights are read once per step); its waits in steps stand for TTFT.

Cells run in the order repetition > max_loras > policy > variant (interleaved, so a machine that
slows down mid-run hits every cell alike). With --variant, each cell runs in a child process whose
PYTHONPATH is that source tree (A/B of two versions of the engine); without it, in this process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def run_cell(policy: str, max_loras: int, adapters: int, concurrency: int, requests: int, warmup: int,
             prompt_len: int, output_len: int, seed: int, settings: dict[str, int], fake_model: bool = False
             ) -> dict[str, float]:
    import torch

    from lorascope import SamplingParams
    from lorascope.config import EngineConfig
    from lorascope.engine.engine import LLMEngine
    from lorascope.loadgen.laws import parse_traffic

    torch.set_num_threads(1)  # the client and server of the study had their own cores; here one thread each run
    cfg = EngineConfig(model="tiny", max_loras=max_loras, max_lora_rank=16, policy=policy,
                       lora_target_modules=("q_proj", "v_proj"), seed=seed, **settings)
    engine = LLMEngine(cfg, f"synthetic:{adapters}:16")
    if fake_model:
        vocab = engine.model_cfg.vocab_size

        def stub(scheduled, slot_of):  # what the runner returns, without running the model
            for req, _ in scheduled:
                if req.adapter is not None:
                    slot_of(req.adapter)  # the slot must exist, as for the real step
            samplers = [r for r, n in scheduled if r.num_computed + n == r.num_tokens]
            return samplers, torch.zeros(len(samplers), vocab) if samplers else None

        engine.runner.execute = stub
    names = engine.source.names()
    rng = np.random.default_rng(seed)
    total = warmup + requests
    which = parse_traffic("zipf:1.5").sample(len(names), total + 4 * concurrency, rng)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    sent = 0
    in_flight: set = set()
    measured: list = []
    window = [0.0, 0.0]  # from the first measured send to the last measured send: concurrency is C throughout
    window_tokens = 0
    cpu = [0.0, 0.0]  # process CPU time over the window (every thread): less sensitive to other load on the machine
    while sent < total or any(not r.finished for r in measured):
        while len(in_flight) < concurrency:
            prompt = rng.integers(1, 255, prompt_len).tolist()
            req = engine.add_request(prompt, params, names[which[sent % len(which)]])
            if warmup <= sent < total:
                measured.append(req)
                if sent == warmup:
                    window[0], cpu[0] = time.perf_counter(), time.process_time()
                if sent == total - 1:
                    window[1], cpu[1] = time.perf_counter(), time.process_time()
            in_flight.add(req)
            sent += 1
        t0 = time.perf_counter()
        progressed = engine.step()
        if window[0] and not window[1] and t0 >= window[0]:
            window_tokens += sum(1 for r in progressed if r.output_ids)
        for req in progressed:
            if req.finished:
                in_flight.discard(req)
        if fake_model:
            if hasattr(engine.cache, "settle"):
                engine.cache.settle()
            else:  # an engine from before `settle` existed (--variant A/B)
                concurrent.futures.wait(list(engine.cache._loading.values()))
    steps = [s for s in engine.steps if window[0] <= s.start_s <= window[1]]
    stats = engine.cache.stats()
    engine.close()
    ttft = [1e3 * (r.first_token_time - r.arrival_time) for r in measured]
    tpot = [1e3 * (r.finish_time - r.first_token_time) / (len(r.output_ids) - 1) for r in measured if len(r.output_ids) > 1]
    e2e = [1e3 * (r.finish_time - r.arrival_time) for r in measured]

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q))

    return {
        "tok_s": window_tokens / (window[1] - window[0]),
        "tok_per_cpu_s": window_tokens / (cpu[1] - cpu[0]),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90), "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99), "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99),
        "wait_p50_steps": pct([r.wait_steps for r in measured], 50),  # TTFT in steps: free of the machine's noise
        "wait_p99_steps": pct([r.wait_steps for r in measured], 99),
        # arrival -> the step that computed the first token (None for an engine without first_token_step)
        "ttft_p99_steps": pct(ttft_steps, 99) if (ttft_steps := [r.first_token_step - r.arrival_step for r in measured
                                                                 if getattr(r, "first_token_step", None) is not None]) else None,
        "window_s": window[1] - window[0],
        "steps": len(steps),
        "mean_step_ms": 1e3 * statistics.fmean(s.duration_s for s in steps) if steps else 0.0,
        "mean_batch": statistics.fmean(s.num_seqs for s in steps) if steps else 0.0,
        "mean_active_adapters": statistics.fmean(s.num_adapters for s in steps) if steps else 0.0,
        "device_loads": stats["device"]["loads"],  # type: ignore[index]
        "host_loads": stats["host"]["loads"],  # type: ignore[index]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-loras", default="4,8")
    ap.add_argument("--policies", default="vllm,fair")
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=300, help="measured requests per cell")
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT", help="an integer EngineConfig knob")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=SRC",
                    help="run each cell under this source tree too (PYTHONPATH=SRC, child process)")
    ap.add_argument("--fake-model", action="store_true", help="the scheduler alone, in steps (see above)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: a JSON cell spec, prints the JSON result
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    settings = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_cell(**spec)))
        return
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("", "")]
    rows = []
    started = time.time()
    for rep in range(args.repeat):
        for ml in map(int, args.max_loras.split(",")):
            for policy in args.policies.split(","):
                for label, src in variants:
                    spec = {"policy": policy, "max_loras": ml, "adapters": args.adapters, "concurrency": args.concurrency,
                            "requests": args.requests, "warmup": args.warmup, "prompt_len": args.prompt_len,
                            "output_len": args.output_len, "seed": rep, "settings": settings, "fake_model": args.fake_model}
                    if src:
                        env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
                        child = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                                               capture_output=True, text=True, check=True)
                        cell = json.loads(child.stdout.strip().splitlines()[-1])
                    else:
                        cell = run_cell(**spec)
                    cell.update(variant=label, policy=policy, max_loras=ml, rep=rep)
                    rows.append(cell)
                    print(f"rep {rep} ml {ml:3d} {label:>7s} {policy:5s} {cell['tok_s']:7.1f} tok/s  TTFT p50/p99 "
                          f"{cell['ttft_p50_ms']:7.0f} / {cell['ttft_p99_ms']:7.0f} ms  TPOT p99 {cell['tpot_p99_ms']:6.1f} ms  "
                          f"{cell.get('tok_per_cpu_s', 0):6.0f} tok/cpu-s  batch {cell['mean_batch']:4.1f}  wait p99 {cell['wait_p99_steps']:5.0f} steps  TTFT p99 {cell.get('ttft_p99_steps') or 0:5.0f} steps  loads {cell['device_loads']}",
                          flush=True)
    print("\nmedians over repetitions")
    summary = []
    for ml in map(int, args.max_loras.split(",")):
        for policy in args.policies.split(","):
            for label, _ in variants:
                cells = [r for r in rows if r["max_loras"] == ml and r["policy"] == policy and r["variant"] == label]
                med = {k: statistics.median(c[k] for c in cells) for k in ("tok_s", "tok_per_cpu_s", "mean_batch", "ttft_p50_ms", "ttft_p99_ms", "wait_p99_steps",
                                                                  "tpot_p99_ms") if all(k in c for c in cells)}
                summary.append({"variant": label, "policy": policy, "max_loras": ml, "n": len(cells), **med,
                                "tok_s_all": [round(c["tok_s"]) for c in cells],
                                "ttft_p99_all": [round(c["ttft_p99_ms"]) for c in cells]})
                print(f"ml {ml:3d} {label:>7s} {policy:5s} {med['tok_s']:7.1f} tok/s {summary[-1]['tok_s_all']}  "
                      f"{med.get('tok_per_cpu_s', 0):6.0f} tok/cpu-s  batch {med.get('mean_batch', 0):4.1f}  TTFT p50 "
                      f"{med['ttft_p50_ms']:6.0f}  p99 {med['ttft_p99_ms']:6.0f} ms {summary[-1]['ttft_p99_all']}  "
                      f"wait p99 {med.get('wait_p99_steps', 0):4.0f} steps  TPOT p99 {med['tpot_p99_ms']:6.1f} ms")
    out = args.out or Path(f"benchmarks/results/cpu_fair_{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv, "machine": f"{platform.node()} {os.cpu_count()} cpus",
                               "elapsed_s": time.time() - started, "summary": summary, "cells": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
