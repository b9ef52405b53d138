"""The seed benchmark on one GPU, in one call (issue 6): the embedded engine through its async API on
the `llama-3.1-8b` shape (random bf16 weights), 128 prompt + 128 output tokens (ignore_eos), closed
loop, rank-16 q/v synthetic adapters; HF transformers + PEFT on the same GPU and weights as baseline.

    PYTHONPATH=src python3 benchmarks/gpu_seed.py --out $OUT                 # the H200 run (~7 min)
    PYTHONPATH=src python3 benchmarks/gpu_seed.py --model tiny --device cpu --quick --out /tmp/seed-smoke

Cells (`--plan-only` lists them with a runtime estimate; `--only REGEX` picks by cell id):
- main/:   N in {1, 1000} x {uniform, zipf:1.5} x c in {32, 256}, max_loras 256, `fair`. N=1 under
           Zipf draws exactly N=1 uniform's requests, so it is reported as that cell (not re-run).
- http/:   main's N=1000 uniform c=32 through `lorascope serve`'s app (uvicorn, in this process
           around the same engine: no second 16 GB model) with the loadgen client in a child process.
- scale/:  10,000 adapters from `synthetic:10000:16:20` (generated on load, 20 ms injected per load),
           uniform, c=32, max_loras 256, host tier 1,000 (a0000..a0999 read before the cell, as a
           running server's tier is full: 90% of requests still load from the source, evicting one).
- budget/: `--budgets C:B,...`: N=1 and N=1000 uniform at concurrency C with a token budget of B
           (A/B of `token_budget`), on the main engine, each pair with its own requests.
- sweep/:  max_loras in {4 ... 1024}, N=1000, c=32: uniform under `vllm` and `fair`, Zipf 1.5 under
           `fair` for max_loras >= 32 (the p99 TTFT target); max_loras 256 cells are main's.
- sweepC/: the study's sweep C: Zipf 1.5, N=500, c=32, max_loras 4 and 8, both policies.
- hf/:     HF + PEFT, batch 32, 128 new tokens greedy: (a) one adapter for every row; (b) 100
           adapters, rows drawn uniformly, in ONE mixed batch through PEFT's `adapter_names=`
           (per layer it loops over the distinct adapters of the batch).

Adapters: `synthetic:1000:16:0:0` (a0000.. with seed 0) behind a memo, so an engine rebuilt with
other knobs does not regenerate them; every engine's host tier (max_cpu_loras = max(1000,
max_loras)) holds all 1,000 (~13.6 GB pinned), filled before the engine starts, and its first
min(max_loras, 1000) adapters are preloaded into device slots: N=1000 cells measure the steady
state (device loads of host-resident adapters are part of it). The 10k engine starts the same way,
with a0000..a0999 of its source in the host tier and a0000..a0255 in the slots. HF's 100 adapters
are a0000..a0099 of the same seed, written to disk as PEFT directories.

Engines: one model for the whole run (its weights are shared by every engine and by HF); one engine
per (adapter source, max_loras), max_num_seqs = the largest concurrency of its cells,
max_num_batched_tokens 1,024 (CUDA graphs up to it), pipelined steps (`--lockstep`: off); policy and
token budget swapped on the idle engine between cells (`token_budget`: 2 tokens per sequence in
flight, at least 128: 128 at c=32, 512 at c=256). After each build: CUDA graphs of every batch bucket are captured
and the prefill path is warmed, untimed. Each cell then runs W = c warm-up requests (out of every
statistic) before its M measured ones (default max(256, 4c)), all in one closed loop.

Per cell: output tok/s over the steady window (from the send of the first measured request to the
send of the last, when c requests are in flight throughout; the drain after it is excluded, and
`tok_s_with_drain` includes it), p50/p99 TTFT and p50 TPOT from the client's clock, the engine's steps
in the window (mean batch, distinct adapters per step, decode step time), adapter-cache counters,
and the achieved bandwidth:

    bytes = steps x W  +  sum over steps of distinct adapters x A  +  tokens x (P + O/2) x K
    achieved GB/s = bytes / window seconds;  fraction = achieved / measured copy rate

with W the weight bytes a step reads (every parameter but the embedding table, which a step only
gathers rows of; a tied table is the LM head and counts), A one adapter's bytes (rank 16, q and v,
every layer), K the KV bytes of one token (2 x layers x kv_heads x head_dim x dtype bytes), P + O/2
the mean context a generated token attends over (fixed lengths), and the copy rate 2 x bytes / time
of a 1 GiB device-to-device copy (read + write). Prefill steps count one weight read, like decode.
The compute side: % matmul = window tokens x F / window seconds / the measured dense matmul rate (an
8192^3 GEMM in the run's dtype), with F the FLOPs one output token costs (`flops_per_output_token`: the
prompt's and the decode steps' forwards through the linear weights and attention, plus one LM-head row);
rate / F is the workload's compute bound, printed in the table's header and beside the c=256 check (on
a CPU, where a 1024^3 GEMM is the yardstick, the fraction can pass 100%: read it on the GPU only).

Robustness: a cell that fails is recorded with its error and the run goes on; `gpu_seed.json` (and
the table, `gpu_seed.md`) is rewritten after every cell; a cell whose estimated time (from the rates
measured so far) would pass `--budget-s` (540) is skipped and recorded, and a cell is cancelled after
6x its estimate. Engines run in this order: main, 10k, HF, then the sweep's (4, 8, 1024, 32 ... 512,
16), so a short budget loses the fewest checks. The default matrix is ~7 min at 6,000 tok/s (c=32)
and 20,000 (c=256); `--plan-only --assume-tok-s 32:R1,256:R2` prints the estimate at other rates;
if it is too long, scale requests (`--requests-scale`) or split it over two calls, e.g.
`--only 'main|http|scale|hf|sweepC'` then `--only 'sweep/'`.

Engine API gaps worked around here: no prebuilt model for LLMEngine (load_model patched while the
constructor runs), no live policy switch (the idle engine's scheduler.policy is replaced on the engine
thread through AsyncLLMEngine._call), no host-tier warm-up (cache.prefetch_host before start), no
timestamps on the async API's deltas (the client's clock; engine-side TTFT from finish_hooks).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _seed_driver import (
    MemoSource,
    SharedModel,
    bandwidth,
    cache_delta,
    capture_graphs,
    drive_api,
    drive_http,
    fill_host_tier,
    phase_stats,
    set_policy,
    step_stats,
    sync_generate,
)
from lorascope.adapters.source import SyntheticSource
from lorascope.config import EngineConfig
from lorascope.loadgen.workload import build_workload
from lorascope.model.config import LORA_TARGET_MODULES

DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
TARGETS = ("q_proj", "v_proj")
RANK = 16


@dataclass(frozen=True, slots=True)
class Plan:
    model: str = "llama-3.1-8b"
    device: str = "cuda"
    dtype: str = "bfloat16"
    prompt_len: int = 128
    output_len: int = 128
    pool: int = 1000  # adapters of the main source
    scale_count: int = 10_000
    scale_latency_ms: float = 20.0
    scale_host_tier: int = 1000  # max_cpu_loras of the scale cell
    main_max_loras: int = 256
    concurrencies: tuple[int, ...] = (32, 256)
    sweep: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
    zipf_sweep_min: int = 32  # Zipf sweep cells (fair) from this max_loras up
    sweep_c: tuple[int, ...] = (4, 8)
    sweep_c_n: int = 500
    hf_adapters: int = 100
    hf_batch: int = 32
    min_requests: int = 256
    rounds: int = 4  # measured requests per cell: max(min_requests, rounds x c) x requests_scale
    requests_scale: float = 1.0
    seed: int = 0
    loader_threads: int = 16
    assumed_tok_s: tuple[tuple[int, float], ...] = ((32, 6000.0), (256, 20000.0))
    max_step_tokens: int = 1024  # engines are built with this max_num_batched_tokens (graphs up to it)
    async_scheduling: bool = True  # pipelined steps (engine.py); --lockstep turns them off
    assumed_build_s: float = 8.0
    assumed_fixed_s: float = 45.0  # model init, adapter generation, first compiles
    assumed_hf_s: float = 60.0
    budgets: tuple[tuple[int, int], ...] = ()  # (concurrency, token budget) cells beside main's: --budgets


QUICK = {
    "prompt_len": 32,
    "output_len": 16,
    "pool": 64,
    "scale_count": 256,
    "scale_host_tier": 32,
    "main_max_loras": 16,
    "concurrencies": (4, 16),
    "sweep": (4, 16, 64),
    "zipf_sweep_min": 16,
    "sweep_c": (4, 8),
    "sweep_c_n": 32,
    "hf_adapters": 8,
    "hf_batch": 4,
    "min_requests": 24,
    "rounds": 2,
    "assumed_tok_s": ((4, 150.0), (16, 400.0)),
    "assumed_build_s": 1.0,
    "assumed_fixed_s": 5.0,
    "assumed_hf_s": 5.0,
}


@dataclass(frozen=True, slots=True)
class Cell:
    cell_id: str
    n: int
    traffic: str
    concurrency: int
    max_loras: int
    policy: str = "fair"
    source: str = "pool"  # pool | scale
    via: str = "api"  # api | http
    same_as: str | None = None  # measured by that cell (identical config)
    budget: int | None = None  # max_num_batched_tokens of the cell (None: token_budget)
    workload_seed: int = 0  # added to the plan's seed: cells on one engine that must not share requests

    @property
    def engine(self) -> tuple[str, int]:
        return self.source, self.max_loras


def token_budget(p: Plan, concurrency: int) -> int:
    """A cell's max_num_batched_tokens: 2 tokens per sequence in flight, at least 128, at most the
    engine's: 128 at c=32, 512 at c=256. Prompts then spread over the decode steps (bound by weight
    reads, not compute) instead of arriving as one wave of c x 128 tokens. Measured on the H200
    (RESULTS.md, 2026-11-29, `--budgets`): at c=32, 64 / 96 / 128 / 256 gave 5,238 / 5,338 / 5,390 /
    5,267 tok/s with one adapter (64: a prompt spread over four steps leaves the batch short); at
    c=256, 512 gave 13,860 and 1,024 gave 12,903 (N=1000 uniform)."""
    return min(p.max_step_tokens, max(128, 2 * concurrency))


def law_tag(traffic: str) -> str:
    return traffic.replace(":", "")


def build_cells(p: Plan) -> list[Cell]:
    lo, ml = p.concurrencies[0], p.main_max_loras
    # with one adapter every law draws the same requests: N=1 Zipf is N=1 uniform's measurement
    main = [
        Cell(
            f"main/n{n}-{law_tag(t)}-c{c}",
            n,
            t,
            c,
            ml,
            same_as=f"main/n1-uniform-c{c}" if n == 1 and t != "uniform" else None,
        )
        for c in p.concurrencies
        for n in (1, p.pool)
        for t in ("uniform", "zipf:1.5")
    ]
    http = [Cell(f"http/n{p.pool}-uniform-c{lo}", p.pool, "uniform", lo, ml, via="http")]
    scale = [Cell(f"scale/n{p.scale_count}-uniform-c{lo}", p.scale_count, "uniform", lo, ml, source="scale")]
    sweep = []
    for m in p.sweep:
        for traffic, policy in (("uniform", "fair"), ("uniform", "vllm"), ("zipf:1.5", "fair")):
            if traffic != "uniform" and m < p.zipf_sweep_min:
                continue
            alias = f"main/n{p.pool}-{law_tag(traffic)}-c{lo}" if m == ml and policy == "fair" else None
            sweep.append(
                Cell(f"sweep/{law_tag(traffic)}-ml{m}-{policy}", p.pool, traffic, lo, m, policy, same_as=alias)
            )
    sweep_c = [
        Cell(f"sweepC/n{p.sweep_c_n}-zipf1.5-ml{m}-{policy}", p.sweep_c_n, "zipf:1.5", lo, m, policy)
        for m in p.sweep_c
        for policy in ("fair", "vllm")
    ]
    # main engine: its c=lo cells, the HTTP cell beside them, then c=hi; `fair` before `vllm` everywhere
    ordered = [c for c in main if c.concurrency == lo] + http + [c for c in main if c.concurrency != lo]
    hf = [
        Cell("hf/one-adapter", 1, "uniform", p.hf_batch, 0, source="hf"),
        Cell(f"hf/uniform-{p.hf_adapters}", p.hf_adapters, "uniform", p.hf_batch, 0, source="hf"),
    ]
    # other requests than main's (and each other's): adapters a cell left resident must not serve the next
    budget = [
        Cell(f"budget/n{n}-uniform-c{c}-b{b}", n, "uniform", c, ml, budget=b, workload_seed=1 + i)
        for i, (c, b) in enumerate(p.budgets)
        for n in (1, p.pool)
    ]
    ordered += budget + scale + sweep + sweep_c + hf
    return sorted(ordered, key=lambda c: c.policy == "vllm")


def engine_order(p: Plan) -> list[tuple[str, int]]:
    """Main engine, the 10k engine, HF (marker), then the sweep's engines."""
    # sweep C's engines first, then the largest (the U-curve's right side), then the rest ascending:
    # if the time budget runs out, the fewest checks lose their cells
    first = [*p.sweep_c, max(p.sweep)]
    rest = first + sorted((set(p.sweep) | set(p.sweep_c)) - set(first), key=lambda m: (m < p.zipf_sweep_min, m))
    order = [m for i, m in enumerate(rest) if m != p.main_max_loras and m not in rest[:i]]
    return [("pool", p.main_max_loras), ("scale", p.main_max_loras), ("hf", 0)] + [("pool", m) for m in order]


def cell_requests(p: Plan, c: int) -> tuple[int, int]:
    """(warm-up W, measured M) of a cell at concurrency c."""
    return c, max(2, round(max(p.min_requests, p.rounds * c) * p.requests_scale))


def assumed_rate(p: Plan, c: int) -> float:
    known = dict(p.assumed_tok_s)
    if c in known:
        return known[c]
    (c0, r0), (c1, r1) = p.assumed_tok_s[0], p.assumed_tok_s[-1]
    slope = np.log(r1 / r0) / np.log(c1 / c0) if c1 != c0 else 1.0
    return float(r0 * (c / c0) ** slope)


def cell_seconds(p: Plan, c: int, rate: float) -> float:
    w, m = cell_requests(p, c)
    return (w + m) * p.output_len / rate + p.output_len * c / rate  # requests, then the drain


def estimate(p: Plan, cells: list[Cell]) -> dict[str, float]:
    """Seconds the run should take at the plan's assumed rates (a budget guide, printed first)."""
    real = [c for c in cells if c.same_as is None and c.source != "hf"]  # HF: one lump
    engines = {c.engine for c in real}
    est = {
        "cells_s": sum(cell_seconds(p, c.concurrency, assumed_rate(p, c.concurrency)) for c in real),
        "builds_s": len(engines) * p.assumed_build_s,
        "fixed_s": p.assumed_fixed_s,
        "hf_s": p.assumed_hf_s if any(c.source == "hf" for c in cells) else 0.0,
    }
    est["total_s"] = sum(est.values())
    return est


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} +{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


_T0 = time.perf_counter()


def copy_rate_gbs(device: str) -> float:
    """2 x bytes / time of a large same-device copy (read + write), the yardstick for achieved GB/s."""
    n = (1 << 29) if device.startswith("cuda") else (1 << 26)  # bf16 elements: 1 GiB on the GPU, 128 MiB on CPU
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    start, iters = time.perf_counter(), 10
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * n * 2 * iters / (time.perf_counter() - start) / 1e9


def matmul_rate_tflops(device: str, dtype: torch.dtype) -> float:
    """Dense matmul rate of a large square GEMM (n = 8192 on the GPU, 1024 on CPU), the yardstick for the
    compute-bound tok/s: no GEMM of the model's shapes runs faster than this."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    _sync(device)
    start, iters = time.perf_counter(), 20 if device.startswith("cuda") else 3
    for _ in range(iters):
        torch.matmul(a, b, out=c)
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_bytes(loaded: Any, p: Plan) -> dict[str, float]:
    decoder, cfg = loaded.model, loaded.cfg
    weights = sum(t.numel() * t.element_size() for t in decoder.parameters())
    if decoder.lm_head is not None:  # the embedding table is only gathered from
        emb = decoder.model.embed_tokens.weight
        weights -= emb.numel() * emb.element_size()
    elem = torch.finfo(getattr(torch, p.dtype)).bits // 8
    adapter = cfg.num_hidden_layers * sum(RANK * sum(cfg.module_shape(m)) for m in TARGETS) * elem
    kv_token = 2 * cfg.num_hidden_layers * cfg.kv_size * elem
    return {
        "weight_bytes": weights,
        "adapter_bytes": adapter,
        "kv_bytes_per_token": kv_token,
        "kv_bytes_per_output_token": kv_token * (p.prompt_len + p.output_len / 2),
        "flops_per_output_token": flops_per_output_token(cfg, p),
    }


def flops_per_output_token(cfg: Any, p: Plan) -> float:
    """Dense FLOPs the workload spends per output token (fixed lengths P + O, closed loop): each request
    runs P + O - 1 token forwards (the prompt, then O - 1 decode steps) through the layers' linear weights
    (2 FLOPs a weight), attention's QK^T and PV (4 x q_size x context a layer, mean context ~(P + O) / 2),
    and O LM-head rows (the prompt's other positions need no logits). LoRA's rank-16 q/v products add
    ~0.1% and are left out. Divided into a measured matmul rate, this is the workload's compute bound."""
    linear = cfg.num_hidden_layers * sum(i * o for i, o in map(cfg.module_shape, LORA_TARGET_MODULES))
    attention = 4 * cfg.num_hidden_layers * cfg.q_size * (p.prompt_len + p.output_len) / 2
    forwards = p.prompt_len + p.output_len - 1
    return (forwards * (2 * linear + attention) + p.output_len * 2 * cfg.vocab_size * cfg.hidden_size) / p.output_len


@dataclass
class Seed:
    """One run: builds engines in order, runs their cells, writes gpu_seed.json after every cell."""

    plan: Plan
    out: Path
    cells: list[Cell]
    budget_s: float
    shared: SharedModel = field(default_factory=SharedModel)
    report: dict[str, Any] = field(default_factory=dict)
    observed: dict[int, list[float]] = field(default_factory=dict)
    engine_ttft_s: dict[str, float] = field(default_factory=dict)
    builds_s: list[float] = field(default_factory=list)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lorascope-seed-")))
    pool_source: Any = None
    bytes: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - _T0

    def write(self) -> None:
        self.report["checks"] = checks(self.plan, self.report["cells"], self.report.get("hf", {}))
        self.report["elapsed_s"] = self.elapsed()
        tmp = self.out / "gpu_seed.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.out / "gpu_seed.json")
        (self.out / "gpu_seed.md").write_text(render(self.plan, self.report))

    def record(self, cell: Cell, entry: dict[str, Any]) -> None:
        self.report["cells"][cell.cell_id] = {"config": asdict(cell), **entry}
        for other in self.cells:  # cells measured by this one
            if other.same_as == cell.cell_id:
                self.report["cells"][other.cell_id] = {"config": asdict(other), "same_as": cell.cell_id, **entry}
        self.write()

    # -- the model and engines
    def loaded(self) -> Any:
        p = self.plan
        loaded = self.shared.get(p.model, p.dtype, p.device, p.prompt_len + p.output_len + 16, p.seed)
        if not self.bytes:
            self.bytes = model_bytes(loaded, p)
            self.report["meta"]["model_bytes"] = self.bytes
            self.report["meta"]["model_build_s"] = self.shared.build_s
        return loaded

    def build(self, source: str, max_loras: int, max_num_seqs: int) -> tuple[Any, dict[str, Any]]:
        p = self.plan
        start = time.perf_counter()
        self.loaded()
        if source == "pool":
            if self.pool_source is None:
                self.pool_source = MemoSource(SyntheticSource.parse(f"synthetic:{p.pool}:{RANK}:0:{p.seed}"))
            src, host = self.pool_source, max(p.pool, max_loras)
        else:
            src = SyntheticSource.parse(f"synthetic:{p.scale_count}:{RANK}:{p.scale_latency_ms:g}:{p.seed}")
            host = max(p.scale_host_tier, max_loras)
        cfg = EngineConfig(
            model=p.model,
            dtype=p.dtype,
            device=p.device,
            seed=p.seed,
            max_loras=max_loras,
            max_cpu_loras=host,
            max_lora_rank=RANK,
            lora_target_modules=TARGETS,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=p.max_step_tokens,
            async_scheduling=p.async_scheduling,
            max_model_len=p.prompt_len + p.output_len + 16,
            loader_threads=p.loader_threads,
        )
        aeng = self.shared.engine(cfg, src)
        info: dict[str, Any] = {
            "source": source,
            "max_loras": max_loras,
            "max_cpu_loras": host,
            "max_num_seqs": max_num_seqs,
        }
        info["constructed_s"] = time.perf_counter() - start
        try:
            self.warm(aeng.engine, info)
        except BaseException:
            aeng.shutdown()  # not started: closes its loader threads
            raise
        info["build_s"] = time.perf_counter() - start
        aeng.finish_hooks.append(self._on_finish)
        aeng.start()
        self.builds_s.append(info["build_s"])
        return aeng, info

    def warm(self, eng: Any, info: dict[str, Any]) -> None:
        """Before the engine thread starts, the steady state of a long-running server: the host tier full
        (its first max_cpu_loras adapters; the 10k source's too, so its loads evict and reuse page-locked
        buffers instead of each pinning new memory) and the device slots holding the first max_loras;
        then CUDA graphs of every bucket, and the prefill path with adapters."""
        p, vocab, max_loras = self.plan, eng.model_cfg.vocab_size, eng.cfg.max_loras
        names = eng.source.names()
        rng = np.random.default_rng(p.seed + 11)
        info["host_fill_s"] = fill_host_tier(eng, names[: eng.cfg.max_cpu_loras])
        t = time.perf_counter()
        eng.preload(names[: min(max_loras, len(names))])
        info["preload_s"] = time.perf_counter() - t
        t = time.perf_counter()
        info["graphs_captured"] = capture_graphs(eng, vocab)
        info["capture_s"] = time.perf_counter() - t
        t = time.perf_counter()
        warm = [
            (rng.integers(0, vocab, p.prompt_len).tolist(), names[i % min(max_loras, len(names))])
            for i in range(min(eng.cfg.max_num_seqs, 64))
        ]
        sync_generate(eng, warm, 4)
        info["prefill_warm_s"] = time.perf_counter() - t
        _sync(p.device)
        info["memory_bytes"] = eng.memory_bytes()

    def _on_finish(self, req: Any) -> None:  # engine thread: arrival -> first token, engine side
        if req.first_token_time is not None:
            self.engine_ttft_s[req.request_id] = req.first_token_time - req.arrival_time

    # -- one cell
    def budget_ok(self, seconds: float, what: str) -> bool:
        if self.elapsed() + seconds <= self.budget_s:
            return True
        log(f"skip {what}: needs ~{seconds:.0f} s, {self.budget_s - self.elapsed():.0f} s of the budget left")
        return False

    def rate(self, c: int) -> float:
        seen = self.observed.get(c)
        return float(np.median(seen)) if seen else assumed_rate(self.plan, c)

    def run_cell(self, aeng: Any, cell: Cell) -> None:
        p = self.plan
        est = cell_seconds(p, cell.concurrency, self.rate(cell.concurrency))
        if not self.budget_ok(est, cell.cell_id):
            self.record(cell, {"skipped": f"time budget ({self.budget_s:.0f} s) would be passed"})
            return
        # a stuck cell must not eat the device call: at most 6x its estimate, and never far past the budget
        timeout_s = min(max(60.0, 6 * est), self.budget_s + 45 - self.elapsed())
        log(f"cell {cell.cell_id} (est. {est:.0f} s, timeout {timeout_s:.0f} s)")
        try:
            result = self.measure(aeng, cell, timeout_s)
        except Exception as e:
            traceback.print_exc()
            self.record(cell, {"error": f"{type(e).__name__}: {e}"[:2000]})
            return
        if result.get("tok_s"):
            self.observed.setdefault(cell.concurrency, []).append(result["tok_s"])
        log(
            f"  {result.get('tok_s') or 0:,.0f} tok/s, TTFT p50/p99 {_f(result.get('ttft_p50_ms'))}/"
            f"{_f(result.get('ttft_p99_ms'))} ms, batch {result['mean_batch']:.1f}, "
            f"{result['mean_adapters_per_step']:.1f} adapters/step, engine busy {_pct(result.get('engine_busy_fraction'))}, "
            f"{_f(result.get('achieved_gb_s'))} GB/s ({_pct(result.get('copy_fraction'))} of copy), "
            f"{result['cache'].get('device_loads')} device loads, {result.get('errors')} errors, {result['wall_s']:.1f} s"
        )
        self.record(cell, {"result": result})

    def measure(self, aeng: Any, cell: Cell, timeout_s: float) -> dict[str, Any]:
        p = self.plan
        warmup, measured = cell_requests(p, cell.concurrency)
        names = aeng.engine.source.names()[: cell.n]
        wl = build_workload(
            cell.n,
            cell.traffic,
            warmup + measured,
            p.prompt_len,
            p.output_len,
            p.seed + cell.workload_seed,
            vocab_size=aeng.engine.model_cfg.vocab_size,
        )
        prompts = [(wl.prompt_token_ids(i), names[int(wl.adapter[i])]) for i in range(len(wl))]
        start = time.perf_counter()
        budget = cell.budget or token_budget(p, cell.concurrency)
        asyncio.run(set_policy(aeng, cell.policy, budget))
        trace = cell.via == "api" and p.device.startswith("cuda")
        if trace:
            aeng.engine.trace_gpu(True)  # two CUDA events per step: GPU time vs the host's cadence
        if cell.via == "http":
            before = asyncio.run(aeng.snapshot()).cache
            phase = drive_http(aeng, prompts, cell.concurrency, warmup, p.output_len, self.tmp, timeout_s)
        else:
            drive = drive_api(aeng, prompts, cell.concurrency, warmup, p.output_len, cell.cell_id)
            phase = asyncio.run(asyncio.wait_for(drive, timeout_s))  # cancelling a stream aborts its request
            before = phase.cache_at_start
        after = asyncio.run(aeng.snapshot()).cache
        result: dict[str, Any] = {
            "max_num_batched_tokens": budget,
            "wall_s": time.perf_counter() - start,
            "distinct_adapters": len(set(wl.adapter[warmup:].tolist())),
        }
        result |= phase_stats(phase, p.output_len)
        result["driver_loop_lag_ms"] = phase.loop_lag or None
        gpu = aeng.engine.gpu_step_times() if trace else None
        if trace:
            aeng.engine.trace_gpu(False)
        result |= step_stats(list(aeng.engine.steps), phase.window, gpu)
        result["cache"] = cache_delta(before, after)
        result["cache_counters_include_warmup"] = cell.via == "http"
        ids = [f"{cell.cell_id}-{i}" for i in range(warmup, len(prompts))]
        engine_ttft = [1e3 * self.engine_ttft_s[r] for r in ids if r in self.engine_ttft_s]
        result["engine_ttft_p99_ms"] = float(np.percentile(engine_ttft, 99)) if engine_ttft else None
        result |= bandwidth(
            result["steps"],
            result["adapter_step_sum"],
            result["window_tokens"],
            result["window_s"],
            int(self.bytes["weight_bytes"]),
            int(self.bytes["adapter_bytes"]),
            self.bytes["kv_bytes_per_output_token"],
            self.report["meta"].get("copy_gb_s"),
        )
        rate = self.report["meta"].get("matmul_tflops")
        if rate and result.get("window_s"):
            flops = result["window_tokens"] * self.bytes["flops_per_output_token"]
            result["achieved_tflops"] = flops / result["window_s"] / 1e12
            result["compute_fraction"] = result["achieved_tflops"] / rate
            result["compute_bound_tok_s"] = rate * 1e12 / self.bytes["flops_per_output_token"]
        return result

    # -- the whole run
    def run(self) -> None:
        p = self.plan
        by_engine: dict[tuple[str, int], list[Cell]] = {}
        for cell in self.cells:
            if cell.same_as is None:
                by_engine.setdefault(cell.engine, []).append(cell)
        for key in engine_order(p):
            if key == ("hf", 0):
                if any(c.source == "hf" for c in self.cells):
                    self.run_hf()
                continue
            todo = by_engine.get(key, [])
            if todo:
                self.run_engine(key, todo)
        log(f"done in {self.elapsed():.0f} s")

    def run_engine(self, key: tuple[str, int], todo: list[Cell]) -> None:
        source, max_loras = key
        mns = max(c.concurrency for c in todo)
        build_est = self.builds_s[-1] if self.builds_s else self.plan.assumed_build_s
        if not self.budget_ok(
            build_est + cell_seconds(self.plan, todo[0].concurrency, self.rate(todo[0].concurrency)), f"engine {key}"
        ):
            for cell in todo:
                self.record(cell, {"skipped": f"time budget ({self.budget_s:.0f} s) would be passed"})
            return
        log(f"engine {source} max_loras={max_loras} max_num_seqs={mns}: building")
        try:
            aeng, info = self.build(source, max_loras, mns)
        except Exception as e:
            traceback.print_exc()
            for cell in todo:
                self.record(cell, {"error": f"engine build failed: {type(e).__name__}: {e}"[:2000]})
            _free(self.plan.device)
            return
        self.report["engines"].append(info)
        log(
            f"  built in {info['build_s']:.1f} s ({json.dumps({k: v for k, v in info.items() if k.endswith('_s')}, default=_r)})"
        )
        try:
            for cell in todo:
                self.run_cell(aeng, cell)
        finally:
            aeng.shutdown()
            del aeng
            self.shared.loaded.model.attach_lora(None)  # the model held the engine's slot store
            _free(self.plan.device)

    def run_hf(self) -> None:
        p = self.plan
        if not self.budget_ok(p.assumed_hf_s, "HF + PEFT baseline"):
            self.report["hf"] = {"skipped": "time budget"}
            self.write()
            return
        log(f"HF + PEFT baseline: {p.hf_adapters} adapters, batch {p.hf_batch}, {p.output_len} new tokens")
        # the engine sets torch's BLAS library to cuBLASLt process-wide (engine/runner.py); the baseline
        # runs with torch's own default, as HF + PEFT would in a process of its own
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("default")
        try:
            self.report["hf"] = hf_baseline(self.loaded(), p, self.tmp)
            self.report["hf"]["blas"] = str(torch.backends.cuda.preferred_blas_library())
        except Exception as e:
            traceback.print_exc()
            self.report["hf"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        finally:
            torch.backends.cuda.preferred_blas_library(before)
        _free(p.device)
        self.write()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _r(x: Any) -> Any:
    return round(x, 2) if isinstance(x, float) else str(x)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _f(x: Any, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


# --- HF transformers + PEFT -----------------------------------------------------------------------


def hf_baseline(loaded: Any, p: Plan, tmp: Path) -> dict[str, Any]:
    """Batch `hf_batch` x `output_len` new tokens, greedy, exactly that many (min_new_tokens): (a) one
    adapter for every row; (b) rows over `hf_adapters` adapters drawn uniformly, one mixed batch
    through PEFT's `adapter_names=` (PEFT loops over the batch's distinct adapters in every layer)."""
    import peft
    import transformers
    from peft import PeftModel

    from lorascope.adapters.synthetic import adapter_names, make_adapters
    from lorascope.reference import hf_model_sharing

    out: dict[str, Any] = {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "mixed_batch": "peft adapter_names= (one batch, grouped per layer by PEFT)",
    }
    t = time.perf_counter()
    names = adapter_names(p.pool)[: p.hf_adapters]  # the engine's a0000.. (same seed): the very same weights
    paths = make_adapters(
        tmp / "hf-adapters", p.model, p.hf_adapters, RANK, list(TARGETS), seed=p.seed, dtype=getattr(torch, p.dtype)
    )
    out["adapters_make_s"] = time.perf_counter() - t
    t = time.perf_counter()
    hf = hf_model_sharing(loaded.model, p.device)
    kw = {"autocast_adapter_dtype": False, "low_cpu_mem_usage": True}  # adapters stay bf16, as the engine's
    model = PeftModel.from_pretrained(hf, paths[0], adapter_name=names[0], **kw)
    for name, path in zip(names[1:], paths[1:]):
        model.load_adapter(path, adapter_name=name, **kw)
    model.eval()
    _sync(p.device)
    out["load_s"] = time.perf_counter() - t
    wl = build_workload(
        p.hf_adapters, "uniform", p.hf_batch, p.prompt_len, p.output_len, p.seed, vocab_size=loaded.cfg.vocab_size
    )
    ids = torch.tensor([wl.prompt_token_ids(i) for i in range(p.hf_batch)], device=p.device)
    mixed = [names[int(a)] for a in wl.adapter]

    def generate(tokens: int, **extra: Any) -> float:
        _sync(p.device)
        start = time.perf_counter()
        with torch.inference_mode():
            got = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )
        _sync(p.device)
        if got.shape != (p.hf_batch, p.prompt_len + tokens):
            raise RuntimeError(f"HF generated shape {tuple(got.shape)}, expected {(p.hf_batch, p.prompt_len + tokens)}")
        return time.perf_counter() - start

    model.set_adapter(names[0])
    generate(4)  # warm-up
    s = generate(p.output_len)
    out["one_adapter"] = {"tok_s": p.hf_batch * p.output_len / s, "elapsed_s": s, "distinct_adapters": 1}
    log(f"  HF one adapter: {out['one_adapter']['tok_s']:,.0f} tok/s")
    generate(4, adapter_names=mixed)
    s = generate(p.output_len, adapter_names=mixed)
    out["uniform"] = {"tok_s": p.hf_batch * p.output_len / s, "elapsed_s": s, "distinct_adapters": len(set(mixed))}
    log(
        f"  HF uniform over {p.hf_adapters} ({len(set(mixed))} distinct in the batch): {out['uniform']['tok_s']:,.0f} tok/s"
    )
    model = hf = None  # drop the PEFT wrappers (the weights stay the engine's)
    return out


# --- checks and the table -------------------------------------------------------------------------


def _check(name: str, value: float | None, op: str, target: float, detail: str = "") -> dict[str, Any]:
    if value is None:
        return {
            "check": name,
            "target": f"{op} {target:g}",
            "value": None,
            "status": "n/a",
            "by": None,
            "detail": detail,
        }
    ok = value >= target if op == ">=" else value <= target
    by = value / target - 1 if op == ">=" else target / value - 1 if value else 0.0
    return {
        "check": name,
        "target": f"{op} {target:g}",
        "value": value,
        "status": "PASS" if ok else "MISS",
        "by": by,
        "detail": detail,
    }


def checks(p: Plan, cells: dict[str, Any], hf: dict[str, Any]) -> list[dict[str, Any]]:
    def get(cell_id: str, key: str = "tok_s") -> float | None:
        return cells.get(cell_id, {}).get("result", {}).get(key)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    lo, hi, n = p.concurrencies[0], p.concurrencies[-1], p.pool
    main_u, main_1 = get(f"main/n{n}-uniform-c{lo}"), get(f"main/n1-uniform-c{lo}")
    out = [
        _check(f"c={lo} N={n} uniform tok/s", main_u, ">=", 6000),
        _check(f"c={lo} N={n} uniform / N=1", ratio(main_u, main_1), ">=", 0.95, f"N=1: {_f(main_1)} tok/s"),
        _check(
            f"c={hi} N={n} uniform tok/s",
            get(f"main/n{n}-uniform-c{hi}"),
            ">=",
            30000,
            f"compute bound {_f(get(f'main/n{n}-uniform-c{hi}', 'compute_bound_tok_s'))} tok/s at the measured "
            "matmul rate",
        ),
    ]
    p99 = {
        cid: get(cid, "ttft_p99_ms")
        for cid in cells
        if re.fullmatch(r"sweep/(uniform|zipf1\.5)-ml(\d+)-fair", cid)
        and int(cid.split("-ml")[1].split("-")[0]) >= p.zipf_sweep_min
    }
    worst = max((cid for cid in p99 if p99[cid] is not None), key=lambda cid: p99[cid] or 0.0, default=None)
    missing = [cid for cid, v in p99.items() if v is None]
    out.append(
        _check(
            f"p99 TTFT, c={lo}, fair, every max_loras >= {p.zipf_sweep_min} (worst)",
            None if worst is None or missing else p99[worst],
            "<=",
            150,
            f"worst {worst}" + (f"; not measured: {missing}" if missing else ""),
        )
    )
    for policy in ("fair", "vllm"):
        tok = {m: get(f"sweep/uniform-ml{m}-{policy}") for m in p.sweep}
        best = max((v for v in tok.values() if v), default=None)
        top = max(p.sweep)
        out.append(
            _check(
                f"no right side ({policy}): tok/s at max_loras {top} / best",
                ratio(tok[top], best),
                ">=",
                0.97,
                f"best {_f(best)} at max_loras {max(tok, key=lambda m: tok[m] or 0)}" if best else "",
            )
        )
    for m in p.sweep_c:
        fair, vllm = (f"sweepC/n{p.sweep_c_n}-zipf1.5-ml{m}-{pol}" for pol in ("fair", "vllm"))
        out.append(
            _check(
                f"sweep C max_loras {m}: p99 TTFT vllm / fair",
                ratio(get(vllm, "ttft_p99_ms"), get(fair, "ttft_p99_ms")),
                ">=",
                5,
                f"vllm {_f(get(vllm, 'ttft_p99_ms'))} ms, fair {_f(get(fair, 'ttft_p99_ms'))} ms",
            )
        )
        out.append(_check(f"sweep C max_loras {m}: tok/s fair / vllm", ratio(get(fair), get(vllm)), ">=", 0.90))
    out.append(
        _check(
            f"{p.scale_count} adapters / {n} (c={lo} uniform)",
            ratio(get(f"scale/n{p.scale_count}-uniform-c{lo}"), main_u),
            ">=",
            0.90,
        )
    )
    one, uni = hf.get("one_adapter", {}).get("tok_s"), hf.get("uniform", {}).get("tok_s")
    out.append(_check(f"engine N=1 c={lo} / HF+PEFT one adapter", ratio(main_1, one), ">=", 10, f"HF {_f(one)} tok/s"))
    out.append(
        _check(
            f"engine N={n} uniform c={lo} / HF+PEFT uniform over {p.hf_adapters}",
            ratio(main_u, uni),
            ">=",
            10,
            f"HF {_f(uni)} tok/s",
        )
    )
    return out


COLUMNS = (
    "cell",
    "N",
    "law",
    "c",
    "max_loras",
    "policy",
    "tok/s",
    "TTFT p50",
    "TTFT p99",
    "TPOT p50",
    "batch",
    "adapters/step",
    "dev loads",
    "GB/s",
    "% copy",
    "% matmul",
)


def _row(cell_id: str, entry: dict[str, Any]) -> list[str]:
    cfg, r = entry["config"], entry.get("result")
    head = [cell_id, str(cfg["n"]), cfg["traffic"], str(cfg["concurrency"]), str(cfg["max_loras"]), cfg["policy"]]
    if r is None:
        why = entry.get("error") or entry.get("skipped") or "?"
        return [*head, ("error: " if "error" in entry else "skipped: ") + why.splitlines()[0][:60]] + [""] * 8
    return [
        *head,
        _f(r.get("tok_s")),
        _f(r.get("ttft_p50_ms")),
        _f(r.get("ttft_p99_ms")),
        _f(r.get("tpot_p50_ms"), 1),
        _f(r.get("mean_batch"), 1),
        _f(r.get("mean_adapters_per_step"), 1),
        str(r["cache"].get("device_loads", "")),
        _f(r.get("achieved_gb_s"), 0 if (r.get("achieved_gb_s") or 0) >= 100 else 1),
        _pct(r.get("copy_fraction")),
        _pct(r.get("compute_fraction")),
    ]


def _bound(meta: dict[str, Any]) -> float | None:
    flops, rate = meta.get("model_bytes", {}).get("flops_per_output_token"), meta.get("matmul_tflops")
    return rate * 1e12 / flops if flops and rate else None


def render(p: Plan, report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# gpu_seed: {p.model} {p.dtype} on {meta.get('device_name')}, {p.prompt_len}+{p.output_len} tokens",
        "",
        f"copy rate {_f(meta.get('copy_gb_s'))} GB/s; matmul {_f(meta.get('matmul_tflops'), 1 if (meta.get('matmul_tflops') or 0) >= 10 else 3)} TFLOP/s "
        f"(compute bound {_f(_bound(meta))} tok/s); elapsed {_f(report.get('elapsed_s'))} s; "
        f"ms for TTFT/TPOT; GB/s = bytes the steps must read / window; % matmul = FLOPs / window / matmul "
        f"rate (docstring)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for cell_id, entry in report["cells"].items():
        lines.append("| " + " | ".join(_row(cell_id, entry)) + " |")
    hf = report.get("hf", {})
    for key, label in (("one_adapter", "hf/one-adapter"), ("uniform", f"hf/uniform-{p.hf_adapters}")):
        if key in hf:
            h = hf[key]
            lines.append(
                f"| {label} | {h['distinct_adapters']} distinct | HF+PEFT | {p.hf_batch} (batch) | — | — | "
                f"{_f(h['tok_s'])} |" + " |" * 9
            )
    if "error" in hf or "skipped" in hf:
        lines.append(f"| hf | {hf.get('error') or hf.get('skipped')} |" + " |" * 14)
    lines += ["", "| check | target | measured | status | by | detail |", "|---|---|---|---|---|---|"]
    for c in report.get("checks", []):
        value = "—" if c["value"] is None else f"{c['value']:,.3g}" if abs(c["value"]) < 100 else f"{c['value']:,.0f}"
        by = "" if c["by"] is None else f"{100 * c['by']:+.0f}%"
        lines.append(f"| {c['check']} | {c['target']} | {value} | {c['status']} | {by} | {c['detail']} |")
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="The seed benchmark on one GPU in one call (issue 6); see the docstring.")
    ap.add_argument("--out", type=Path, required=True, help="writes gpu_seed.json and gpu_seed.md here")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    ap.add_argument("--only", default=None, help="regex over cell ids (e.g. 'main|hf', 'sweep/uniform')")
    ap.add_argument("--requests-scale", type=float, default=1.0, help="scales every cell's measured requests")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke matrix (CPU: a few minutes)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip cells that would end past this (seconds)")
    ap.add_argument("--loader-threads", type=int, default=None, help="default: min(16, CPUs)")
    ap.add_argument("--plan-only", action="store_true", help="print the cells and the estimate, run nothing")
    ap.add_argument("--assume-tok-s", default=None, help="rates the estimate assumes, e.g. 32:2400,256:7700")
    ap.add_argument("--lockstep", action="store_true", help="async_scheduling off (A/B of pipelined steps)")
    ap.add_argument("--max-step-tokens", type=int, default=1024, help="engines' max_num_batched_tokens")
    ap.add_argument(
        "--budgets",
        default=None,
        help="extra budget/ cells, CONCURRENCY:TOKENS pairs (e.g. 32:64,32:128): N=1 and N=1000 uniform "
        "on the main engine with that max_num_batched_tokens instead of token_budget's",
    )
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    import os

    plan = Plan(
        model=args.model,
        device=args.device,
        dtype=DTYPE_NAMES[args.dtype],
        requests_scale=args.requests_scale,
        loader_threads=args.loader_threads or min(16, os.cpu_count() or 2),
        async_scheduling=not args.lockstep,
        max_step_tokens=args.max_step_tokens,
    )
    if args.budgets:
        pairs = (item.split(":") for item in args.budgets.split(","))
        plan = replace(plan, budgets=tuple((int(c), int(b)) for c, b in pairs))
    plan = replace(plan, **QUICK) if args.quick else plan  # type: ignore[arg-type]
    if args.assume_tok_s:
        pairs = (item.split(":") for item in args.assume_tok_s.split(","))
        plan = replace(plan, assumed_tok_s=tuple(sorted((int(c), float(r)) for c, r in pairs)))
    return plan


def environment(p: Plan, argv: list[str]) -> dict[str, Any]:
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10).stdout.strip() or None
        except OSError:
            return None

    return {
        "argv": argv,
        "plan": asdict(p),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device_name": torch.cuda.get_device_name() if p.device.startswith("cuda") else "cpu",
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the engine's A/B switches (LORASCOPE_BLAS, LORASCOPE_LORA_OVERLAP, ...) this run was started with
        "lorascope_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORASCOPE_")},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    cells = build_cells(plan)
    if args.only:
        chosen = {c.cell_id for c in cells if re.search(args.only, c.cell_id)}
        cells = [c if c.same_as in chosen else replace(c, same_as=None) for c in cells if c.cell_id in chosen]
    est = estimate(plan, cells)
    print(
        f"{len(cells)} cells ({sum(c.same_as is None and c.source != 'hf' for c in cells)} engine cells to measure, "
        f"{sum(c.source == 'hf' for c in cells)} HF); estimate at "
        f"{', '.join(f'{r:,.0f} tok/s at c={c}' for c, r in plan.assumed_tok_s)}: "
        + ", ".join(f"{k} {v:.0f}" for k, v in est.items()),
        flush=True,
    )
    for c in cells:
        if c.source == "hf":
            print(
                f"  {c.cell_id:34s} batch {plan.hf_batch} over {c.n} adapter(s), {plan.output_len} new tokens",
                flush=True,
            )
            continue
        w, m = cell_requests(plan, c.concurrency)
        print(
            f"  {c.cell_id:34s} N={c.n:<6d} c={c.concurrency:<4d} max_loras={c.max_loras:<5d} {c.policy:5s} "
            f"W={w} M={m}" + (f" = {c.same_as}" if c.same_as else ""),
            flush=True,
        )
    if args.plan_only:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    seed = Seed(plan, args.out, cells, args.budget_s)
    seed.report = {
        "meta": environment(plan, sys.argv if argv is None else argv),
        "estimate_s": est,
        "engines": [],
        "cells": {},
        "hf": {},
    }
    seed.report["meta"]["copy_gb_s"] = copy_rate_gbs(plan.device)
    seed.report["meta"]["matmul_tflops"] = matmul_rate_tflops(plan.device, getattr(torch, plan.dtype))
    log(f"copy rate {seed.report['meta']['copy_gb_s']:,.0f} GB/s, matmul {seed.report['meta']['matmul_tflops']:,.1f} "
        f"TFLOP/s; building {plan.model} ({plan.dtype}, {plan.device})")
    seed.loaded()
    log(f"model built in {seed.shared.build_s:.1f} s")
    seed.run()
    seed.write()
    print("\n" + render(plan, seed.report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
