"""Helpers of gpu_seed.py: engines that share one model, the closed-loop driver (through the async API,
and through HTTP with the client in its own process), and per-cell statistics.

Run as a script it is the HTTP cell's client: `python _seed_driver.py http-client IN.json OUT.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

Prompt = tuple[list[int], str | None]  # (prompt token ids, adapter name or None)


# --- engines ---------------------------------------------------------------------------------------


class MemoSource:
    """An adapter source that keeps every adapter it generated, so rebuilt engines do not generate the
    same 1,000 synthetic adapters again. The engine's host tier pins a HostAdapter in place on first
    load; later loads of the same object are then a lookup (pin_memory of a pinned tensor is a no-op)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self._memo: dict[str, Any] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.inner.names())

    def has(self, name: str) -> bool:
        return bool(self.inner.has(name))

    def load(self, name: str, cfg: Any, max_rank: int, dtype: Any) -> Any:
        with self._lock:
            hit = self._memo.get(name)
        if hit is not None:
            return hit
        adapter = self.inner.load(name, cfg, max_rank, dtype)
        with self._lock:
            return self._memo.setdefault(name, adapter)


class SharedModel:
    """Builds AsyncLLMEngines that share one LoadedModel: LLMEngine has no argument for a prebuilt
    model, so its `load_model` is replaced by a cached one while the constructor runs (and only then).
    One engine is alive at a time: each new engine attaches its own LoRA slot store to the model."""

    def __init__(self) -> None:
        self.loaded: Any = None
        self.build_s: float | None = None
        self._key: tuple[Any, ...] = ()

    def get(
        self, source: str, dtype: str = "float32", device: str = "cpu", max_len: int | None = None, seed: int = 0
    ) -> Any:
        """load_model's signature; the first call builds the model, later ones must ask for the same."""
        from lorascope.model.weights import load_model

        key = (source, dtype, device, max_len, seed)
        if self.loaded is None:
            start = time.perf_counter()
            self.loaded = load_model(source, dtype, device, max_len=max_len, seed=seed)
            _sync(device)
            self.build_s, self._key = time.perf_counter() - start, key
        elif key != self._key:
            raise ValueError(f"the shared model was built as {self._key}, an engine asks for {key}")
        return self.loaded

    def engine(self, cfg: Any, source: Any) -> Any:
        from lorascope.engine import engine as engine_module
        from lorascope.engine.async_engine import AsyncLLMEngine

        with mock.patch.object(engine_module, "load_model", self.get):
            return AsyncLLMEngine(cfg, source)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def sync_generate(eng: Any, prompts: list[Prompt], max_tokens: int) -> None:
    """All prompts at once through the (not yet started) engine, stepping until every one finished."""
    from lorascope.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for ids, adapter in prompts:
        eng.add_request(ids, params, adapter)
    while eng.has_unfinished():
        eng.step()


def fill_host_tier(eng: Any, names: list[str], timeout_s: float = 900.0) -> float:
    """Read `names` into the host tier on the loader threads (the engine is not started yet)."""
    start = time.perf_counter()
    for name in names:
        eng.cache.prefetch_host(name)
    deadline = time.monotonic() + timeout_s
    while any(n not in eng.cache.host for n in names):
        failed = [n for n in names if n in eng.cache.failed]
        if failed:
            raise RuntimeError(f"adapter {failed[0]} failed to load: {eng.cache.failed[failed[0]]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"host tier not filled within {timeout_s} s")
        time.sleep(0.02)
    return time.perf_counter() - start


def capture_graphs(eng: Any, vocab: int) -> int:
    """Capture every CUDA-graph token bucket now (`ModelRunner.capture_all`), so no graph is captured
    inside a measured cell. Returns the buckets captured (0 without graphs, e.g. on CPU)."""
    runner = eng.runner
    if not getattr(runner, "use_graphs", False):
        return 0
    runner.capture_all()
    return len(runner.graphs)


async def on_engine_thread(aeng: Any, fn: Any) -> Any:
    """Run fn on the engine thread between steps (AsyncLLMEngine has no public hook for this)."""
    return await aeng._call(fn)


async def set_policy(aeng: Any, policy: str, max_num_batched_tokens: int | None = None) -> None:
    """Swap the admission policy (and the token budget) of an idle engine: EngineConfig.policy is read
    once, at build, by the scheduler and by the adapter cache (`time_sliced` slots under `fair` only)."""
    from lorascope.engine.policies import make_admission_policy

    eng = aeng.engine
    budget = max_num_batched_tokens or eng.cfg.max_num_batched_tokens

    def swap() -> None:
        if eng.has_unfinished():
            raise RuntimeError("the policy can only change on an idle engine")
        eng.cfg.policy = policy
        eng.cfg.max_num_batched_tokens = budget
        eng.scheduler.policy = make_admission_policy(eng.cfg)
        eng.cache.time_sliced = policy == "fair"

    if eng.cfg.policy != policy or eng.cfg.max_num_batched_tokens != budget:
        await on_engine_thread(aeng, swap)


# --- the closed loop -------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One request as the client saw it; times are time.perf_counter() (CLOCK_MONOTONIC, as the engine's)."""

    index: int
    send_s: float
    first_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class Phase:
    """A closed-loop run: the first `warmup` requests are out of every statistic; throughput counts the
    tokens that arrived in the steady window [send of the first measured request, send of the last]."""

    samples: list[Sample]
    warmup: int
    token_times: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    cache_at_start: dict[str, Any] | None = None
    loop_lag: dict[str, float] = field(default_factory=dict)  # the driver's event-loop lag (ms)


async def drive_api(
    aeng: Any, prompts: list[Prompt], concurrency: int, warmup: int, max_tokens: int, prefix: str
) -> Phase:
    """`concurrency` workers send `prompts` back to back through AsyncLLMEngine.generate."""
    from lorascope.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    phase = Phase([], warmup)
    samples: list[Sample | None] = [None] * len(prompts)
    next_index, window_start, snap = 0, 0.0, None

    async def one(i: int) -> None:
        nonlocal window_start, snap
        s = samples[i] = Sample(i, time.perf_counter())
        if i == warmup:
            window_start = s.send_s
            snap = asyncio.get_running_loop().create_task(aeng.snapshot())
        if i == len(prompts) - 1:
            phase.window = (window_start, s.send_s)
        ids, adapter = prompts[i]
        try:
            async for delta in aeng.generate(ids, params, adapter, f"{prefix}-{i}"):
                if delta.token_ids:
                    now = time.perf_counter()
                    s.first_s = now if s.first_s is None else s.first_s
                    s.tokens += len(delta.token_ids)
                    phase.token_times.append(now)
                    phase.token_counts.append(len(delta.token_ids))
                if delta.error:
                    s.error = delta.error
        except Exception as e:  # a refused or failed request is recorded, the loop goes on
            s.error = f"{type(e).__name__}: {e}"[:300]
        s.end_s = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(prompts):
            next_index += 1
            await one(next_index - 1)

    from lorascope.loadgen.client import LagProbe

    with LagProbe() as probe:  # how late the driver's own loop runs: is the client the bottleneck?
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    phase.loop_lag = probe.summary_ms()
    phase.samples = [s for s in samples if s is not None]
    if snap is not None:
        phase.cache_at_start = (await snap).cache
    return phase


# --- HTTP: the server in this process around the same engine, the client in another -----------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive_http(
    aeng: Any,
    prompts: list[Prompt],
    concurrency: int,
    warmup: int,
    max_tokens: int,
    workdir: Path,
    timeout_s: float = 900.0,
) -> Phase:
    """`lorascope serve`'s app (uvicorn, as `serve` runs it) on 127.0.0.1 around the running engine,
    driven by the loadgen client in a child process (as `bench` drives a server)."""
    import uvicorn

    import lorascope
    from lorascope.server import build_app

    app = build_app(aeng, "base", manage_engine=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="seed-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process HTTP server did not start")
            time.sleep(0.05)
        workdir.mkdir(parents=True, exist_ok=True)
        job, result = workdir / "http-in.json", workdir / "http-out.json"
        job.write_text(
            json.dumps(
                {
                    "url": f"http://127.0.0.1:{port}",
                    "concurrency": concurrency,
                    "warmup": warmup,
                    "max_tokens": max_tokens,
                    "prompts": prompts,
                }
            )
        )
        src = str(Path(lorascope.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [sys.executable, __file__, "http-client", str(job), str(result)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the HTTP client failed: {done.stderr[-2000:]}")
        data = json.loads(result.read_text())
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    phase = Phase(
        [Sample(*row) for row in data["samples"]],
        warmup,
        data["token_times"],
        data["token_counts"],
        tuple(data["window"]),
    )
    return phase


async def _http_client(job: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    from lorascope.loadgen.client import ClientRequest, Target, send

    target, prompts, warmup = Target(job["url"]), job["prompts"], job["warmup"]
    t0 = time.monotonic()  # the records' origin; perf_counter reads the same clock (CLOCK_MONOTONIC)
    records: list[Any] = [None] * len(prompts)
    next_index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < len(prompts):
            i = next_index
            next_index += 1
            ids, adapter = prompts[i]
            req = ClientRequest(i, adapter or "base", adapter, ids, job["max_tokens"], None, i < warmup)
            records[i] = await send(session, target, req, t0, "http", 0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(min(job["concurrency"], len(prompts)))))
    samples, times, counts = [], [], []
    for r in records:
        first = None if r.first_token_s is None else t0 + r.first_token_s
        error = None if r.status == "ok" else f"{r.status}: {r.error}"
        samples.append([r.index, t0 + r.actual_send_s, first, t0 + (r.end_s or 0.0), r.client_output_tokens, error])
        times += [t0 + t for t in r.chunk_times_s]
        counts += list(r.chunk_tokens)
    sends = [row[1] for row in samples]
    return {"samples": samples, "token_times": times, "token_counts": counts, "window": [sends[warmup], sends[-1]]}


# --- statistics ------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def phase_stats(phase: Phase, output_len: int) -> dict[str, Any]:
    """Throughput over the steady window, latency over the measured requests (ms)."""
    measured = phase.samples[phase.warmup :]
    ok = [s for s in measured if s.error is None and s.first_s is not None and s.end_s is not None]
    t_a, t_b = phase.window
    times, counts = np.asarray(phase.token_times), np.asarray(phase.token_counts)
    in_window = int(counts[(times >= t_a) & (times <= t_b)].sum()) if len(times) else 0
    last_end = max((s.end_s or t_a) for s in measured) if measured else t_a
    ttft = [1e3 * (s.first_s - s.send_s) for s in ok]  # type: ignore[operator]
    tpot = [1e3 * (s.end_s - s.first_s) / (s.tokens - 1) for s in ok if s.tokens > 1]  # type: ignore[operator]
    e2e = [1e3 * (s.end_s - s.send_s) for s in ok]  # type: ignore[operator]
    return {
        "requests": len(measured),
        "warmup_requests": phase.warmup,
        "errors": len(measured) - len(ok),
        "first_error": next((s.error for s in measured if s.error), None),
        "short_outputs": sum(s.tokens != output_len for s in ok),
        "window_s": t_b - t_a,
        "window_tokens": in_window,
        "tok_s": in_window / (t_b - t_a) if t_b > t_a else None,
        "tok_s_with_drain": sum(s.tokens for s in measured) / (last_end - t_a) if last_end > t_a else None,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "ttft_max_ms": max(ttft, default=None),
        "tpot_p50_ms": _pct(tpot, 50),
        "e2e_p50_ms": _pct(e2e, 50),
    }


def step_stats(
    steps: list[Any], window: tuple[float, float], gpu: list[tuple[int, float, float]] | None = None
) -> dict[str, Any]:
    """The engine's StepRecords that started inside the window; with `gpu` (LLMEngine.gpu_step_times)
    also the GPU time of their launches: mean per decode step and per step with prompt tokens, and the
    GPU's busy fraction from the window's first traced step to its last (below 1: the GPU waited for
    the host)."""
    t_a, t_b = window
    win = [s for s in steps if t_a <= s.start_s < t_b]
    decode = [s.duration_s for s in win if s.num_tokens == s.num_seqs]
    n = max(1, len(win))
    out = {
        "steps": len(win),
        "mean_batch": sum(s.num_seqs for s in win) / n,
        "mean_adapters_per_step": sum(s.num_adapters for s in win) / n,
        "adapter_step_sum": sum(s.num_adapters for s in win),
        "mean_step_ms": 1e3 * sum(s.duration_s for s in win) / n,
        "engine_busy_fraction": sum(min(s.start_s + s.duration_s, t_b) - s.start_s for s in win) / (t_b - t_a)
        if t_b > t_a
        else None,
        "mean_decode_step_ms": 1e3 * sum(decode) / len(decode) if decode else None,
        "decode_steps": len(decode),
        "mean_prompt_tokens_per_step": sum(s.num_tokens - s.num_seqs for s in win) / n,
        "skipped": sum(s.skipped for s in win),
        "preempted": sum(s.preempted for s in win),
    }
    if gpu:
        by_step = {step: (start, ms) for step, start, ms in gpu}
        traced = [(s, *by_step[s.step]) for s in win if s.step in by_step]
        if traced:
            dec = [ms for s, _, ms in traced if s.num_tokens == s.num_seqs]
            mixed = [ms for s, _, ms in traced if s.num_tokens != s.num_seqs]
            span = traced[-1][1] + traced[-1][2] - traced[0][1]
            out["gpu_traced_steps"] = len(traced)
            out["gpu_decode_step_ms"] = sum(dec) / len(dec) if dec else None
            out["gpu_mixed_step_ms"] = sum(mixed) / len(mixed) if mixed else None
            out["gpu_mean_step_ms"] = sum(ms for *_, ms in traced) / len(traced)
            out["gpu_busy_fraction"] = sum(ms for *_, ms in traced) / span if span > 0 else None
    return out


def cache_delta(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """Adapter-cache counters accrued between two snapshots (per tier: hits, misses, loads, evictions)."""
    out: dict[str, Any] = {"device_resident": after.get("device_resident"), "host_resident": after.get("host_resident")}
    for tier in ("device", "host"):
        for key, value in after[tier].items():
            base = before[tier][key] if before else 0
            out[f"{tier}_{key}"] = round(value - base, 4) if isinstance(value, float) else value - base
    return out


def bandwidth(
    steps: int,
    adapter_steps: int,
    window_tokens: int,
    window_s: float,
    weight_bytes: int,
    adapter_bytes: int,
    kv_bytes_per_token: float,
    copy_gbs: float | None,
) -> dict[str, Any]:
    """Bytes the window's steps must read from memory per second (gpu_seed.py's docstring)."""
    if window_s <= 0:
        return {"achieved_gb_s": None, "copy_fraction": None}
    total = steps * weight_bytes + adapter_steps * adapter_bytes + window_tokens * kv_bytes_per_token
    gbs = total / window_s / 1e9
    return {
        "achieved_gb_s": gbs,
        "copy_fraction": gbs / copy_gbs if copy_gbs else None,
        "bytes_weights": steps * weight_bytes,
        "bytes_adapters": adapter_steps * adapter_bytes,
        "bytes_kv": window_tokens * kv_bytes_per_token,
    }


if __name__ == "__main__" and sys.argv[1:2] == ["http-client"]:
    job_path, out_path = Path(sys.argv[2]), Path(sys.argv[3])
    out_path.write_text(json.dumps(asyncio.run(_http_client(json.loads(job_path.read_text())))))
