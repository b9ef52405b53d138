"""CPU benchmark of synthetic adapter loads (SyntheticSource.load), before vs after the one-buffer,
few-calls generator: per-load wall time on one thread, and the same loads on 4 loader threads beside
a busy pure-Python "engine" thread (small torch ops in a loop, sys.setswitchinterval(0.0005) as the
engine sets it), whose iterations/s show how much the loads take from the engine.

    python benchmarks/cpu_synthetic_load.py [--models llama-3.1-8b,tiny] [--dtype bfloat16]
        [--seconds 4] [--loaders 4] [--repeat 2] [--out benchmarks/results/cpu_synthetic_load_DATE.json]

`before` is the generator of commit 93c7ea2 (one normal_ into a float32 buffer, scaled per block,
cast, then the adapter's tensors taken layer by layer and re-sorted), copied here; `after` is the
installed SyntheticSource. Only the model's config is used (no weights). Where CUDA is available,
each load is followed by the adapter cache's host step (pin_memory() on every tensor, as
AdapterCache._host_get does), since that is what a loader thread runs per load on a GPU host.
`torch_calls` counts the top-level torch ops one load issues (each one takes the GIL back when it
returns). `engine_slowdown` is the engine's lost fraction of iterations/s while the loaders run;
`engine_ms_lost_per_load` divides it by the loads done meanwhile (faster loads do more of them).
Variants alternate within each repetition, so a machine that slows down hits both alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorascope.adapters.source import SyntheticSource
from lorascope.adapters.synthetic import _b_std, _generator_seed
from lorascope.model.config import ModelConfig
from lorascope.model.weights import resolve_config

RANK, TARGETS = 16, ["q_proj", "v_proj"]
Load = Callable[[int], dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]


def _old_weights(cfg: ModelConfig, index: int, dtype: torch.dtype) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """The generator before this change (synthetic._adapter_weights and SyntheticSource.load at 93c7ea2)."""
    gen = torch.Generator().manual_seed(_generator_seed(0, index))
    layers, rank, scale = cfg.num_hidden_layers, RANK, 2.0
    shapes = {m: cfg.module_shape(m) for m in TARGETS}
    flat = torch.empty(layers * rank * sum(i + o for i, o in shapes.values()), dtype=torch.float32).normal_(generator=gen)
    blocks, offset = [], 0
    for module, (fan_in, fan_out) in shapes.items():
        a_end = offset + layers * rank * fan_in
        b_end = a_end + layers * fan_out * rank
        flat[offset:a_end].mul_(1.0 / math.sqrt(fan_in))
        flat[a_end:b_end].mul_(_b_std(cfg, module, rank, scale))
        blocks.append((module, slice(offset, a_end), slice(a_end, b_end)))
        offset = b_end
    flat = flat.to(dtype)
    weights = {}
    for module, a_part, b_part in blocks:
        fan_in, fan_out = shapes[module]
        a_all, b_all = flat[a_part].view(layers, rank, fan_in), flat[b_part].view(layers, fan_out, rank)
        for layer in range(layers):
            weights[layer, module] = (a_all[layer], b_all[layer])
    return {key: weights[key] for key in sorted(weights)}


def make_load(variant: str, cfg: ModelConfig, dtype: torch.dtype) -> Load:
    source = SyntheticSource(10**7, RANK, TARGETS)
    pin = torch.cuda.is_available()

    def load(index: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        if variant == "before":
            weights = _old_weights(cfg, index, dtype)
        else:
            weights = source.load(f"a{index:07d}", cfg, RANK, dtype).weights
        if pin:  # the adapter cache's host step on a CUDA engine
            weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.items()}
        return weights

    return load


def torch_calls(load: Load) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        load(123)
    return sum(1 for e in prof.events() if e.cpu_parent is None)


def single_thread(load: Load, seconds: float) -> dict[str, float]:
    load(0)  # warm-up: allocator, pinned-memory cache
    times, index, end = [], 1, time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        load(index)
        times.append(time.perf_counter() - start)
        index += 1
    return {"load_ms_median": 1e3 * statistics.median(times), "load_ms_mean": 1e3 * statistics.mean(times), "loads": len(times)}


def _engine(stop: threading.Event, counts: list[int]) -> None:
    # a stand-in for the engine's Python-heavy step: small torch ops between bits of bookkeeping
    x = torch.ones(64)
    n, book = 0, {}
    while not stop.is_set():
        y = x * 2.0
        y.add_(1.0)
        book[n % 64] = float(y[n % 64])
        n += 1
    counts.append(n)


def engine_rate(seconds: float, loaders: int, load: Load | None) -> dict[str, float]:
    """Engine iterations/s over `seconds`, with `loaders` threads loading continuously (load given)."""
    stop, counts, times = threading.Event(), [], []
    lock = threading.Lock()

    def loader(thread: int) -> None:
        index = 1000 + thread * 100_000
        while not stop.is_set():
            start = time.perf_counter()
            load(index)
            with lock:
                times.append(time.perf_counter() - start)
            index += 1

    threads = [threading.Thread(target=loader, args=(t,)) for t in range(loaders)] if load is not None else []
    for t in threads:
        t.start()
    time.sleep(0.3)  # loaders in steady state before the engine is timed
    engine = threading.Thread(target=_engine, args=(stop, counts))
    start = time.perf_counter()
    engine.start()
    time.sleep(seconds)
    stop.set()
    engine.join()
    elapsed = time.perf_counter() - start
    for t in threads:
        t.join()
    out = {"engine_iters_per_s": counts[0] / elapsed}
    if times:
        out |= {"load_ms_median": 1e3 * statistics.median(times), "loads_per_s": len(times) / (elapsed + 0.3)}
    return out


def _engine_ms_per_load(alone: float, busy: dict[str, float]) -> float:
    # engine time lost per load: faster loads mean more loads in the window, so compare per load
    return 1e3 * (1.0 - busy["engine_iters_per_s"] / alone) / busy["loads_per_s"]


def run_model(model: str, dtype: torch.dtype, seconds: float, loaders: int, repeat: int) -> dict[str, object]:
    cfg = resolve_config(model)
    loads = {v: make_load(v, cfg, dtype) for v in ("before", "after")}
    result: dict[str, object] = {"torch_calls_per_load": {v: torch_calls(f) for v, f in loads.items()}}
    runs: dict[str, list[dict[str, object]]] = {"before": [], "after": []}
    for _ in range(repeat):
        alone = engine_rate(seconds, 0, None)["engine_iters_per_s"]
        for variant, load in loads.items():
            single = single_thread(load, seconds)
            busy = engine_rate(seconds, loaders, load)
            busy["engine_slowdown"] = 1.0 - busy["engine_iters_per_s"] / alone
            busy["engine_ms_lost_per_load"] = _engine_ms_per_load(alone, busy)
            runs[variant].append({"engine_alone_iters_per_s": alone, "single_thread": single, "with_loaders": busy})
            print(f"{model} {variant}: single {single['load_ms_median']:.2f} ms/load; {loaders} loaders "
                  f"{busy['load_ms_median']:.2f} ms/load, engine {busy['engine_iters_per_s']:.0f} it/s vs {alone:.0f} alone "
                  f"(slowdown {100 * busy['engine_slowdown']:.1f}%, {busy['loads_per_s']:.1f} loads/s, "
                  f"{busy['engine_ms_lost_per_load']:.2f} engine-ms lost per load)", flush=True)
    result["runs"] = runs
    result["summary"] = {
        v: {
            "single_load_ms": statistics.median(r["single_thread"]["load_ms_median"] for r in rs),
            "busy_load_ms": statistics.median(r["with_loaders"]["load_ms_median"] for r in rs),
            "engine_slowdown": statistics.median(r["with_loaders"]["engine_slowdown"] for r in rs),
            "loads_per_s": statistics.median(r["with_loaders"]["loads_per_s"] for r in rs),
            "engine_ms_lost_per_load": statistics.median(r["with_loaders"]["engine_ms_lost_per_load"] for r in rs),
        }
        for v, rs in runs.items()
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama-3.1-8b,tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--loaders", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/cpu_synthetic_load_{datetime.date.today()}.json"))
    args = parser.parse_args()
    sys.setswitchinterval(0.0005)  # as the engine sets it
    dtype = getattr(torch, args.dtype)
    report = {
        "settings": vars(args) | {"out": str(args.out), "rank": RANK, "targets": TARGETS},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "intra_op_threads": torch.get_num_threads()},
        "models": {m: run_model(m, dtype, args.seconds, args.loaders, args.repeat) for m in args.models.split(",")},
    }
    for model, r in report["models"].items():
        print(model, json.dumps(r["torch_calls_per_load"]), json.dumps(r["summary"], indent=None))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
