"""The compute bound of issue 6's workload on this GPU: what dense bf16 GEMMs reach, and what tok/s that
allows at 128 prompt + 128 output tokens on the llama-3.1-8b shape.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_compute_bound.py --out $OUT/compute_bound.json

Times (CUDA events, median of 20 after 5 warm-ups, under torch's default BLAS and cuBLASLt):
- square GEMMs n = 4096, 8192, 16384 (the best case for the tensor cores);
- one layer's four packed weight GEMMs (qkv, o, gate_up, down) at M tokens, M = 256, 512, 1024, 2048:
  a c=256 step carries ~236 decode tokens plus a ~256-token prompt chunk, so M ~ 512 is its shape.
The bound is rate / F, F = `gpu_seed.flops_per_output_token` (~29.0 GFLOP: every output token brings one
prompt token through the weights, plus one LM-head row). No engine can pass rate / F tok/s on this
workload, whatever its scheduling, because every one of those FLOPs must run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gpu_seed import Plan, flops_per_output_token
from lorascope.model.presets import PRESETS


def time_ms(fn, device: str, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run at small sizes")
    args = ap.parse_args()
    dev = args.device
    squares, tokens = ((4096, 8192, 16384), (256, 512, 1024, 2048)) if dev == "cuda" else ((256, 512), (16, 32))
    cfg = PRESETS["llama-3.1-8b"]
    flops_out = flops_per_output_token(cfg, Plan(model="llama-3.1-8b", device=dev, dtype="bfloat16"))
    def packed(*modules: str) -> tuple[int, int]:  # one GEMM over modules sharing an input (Decoder.pack_projections)
        shapes = [cfg.module_shape(m) for m in modules]
        return shapes[0][0], sum(o for _, o in shapes)

    layer = {"qkv": packed("q_proj", "k_proj", "v_proj"), "o": packed("o_proj"),
             "gate_up": packed("gate_proj", "up_proj"), "down": packed("down_proj")}
    dt = torch.bfloat16
    report: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                    "flops_per_output_token": flops_out, "square": {}, "layer": {}}
    for blas in ("default", "cublaslt") if dev == "cuda" else ("default",):
        if dev == "cuda":
            torch.backends.cuda.preferred_blas_library(blas)
        for n in squares:
            a, b = torch.randn(n, n, dtype=dt, device=dev), torch.randn(n, n, dtype=dt, device=dev)
            out = torch.empty(n, n, dtype=dt, device=dev)
            ms = time_ms(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), dev)
            tflops = 2 * n**3 / ms / 1e9
            report["square"][f"{blas}/{n}"] = {"ms": ms, "tflops": tflops, "bound_tok_s": tflops * 1e12 / flops_out}
            print(f"{blas:8s} square {n:5d}: {ms:7.3f} ms, {tflops:6.1f} TFLOP/s -> bound "
                  f"{tflops * 1e12 / flops_out:,.0f} tok/s", flush=True)
            del a, b, out
        weights = {k: torch.randn(o, i_, dtype=dt, device=dev) for k, (i_, o) in layer.items()}
        for m in tokens:
            xs = {k: torch.randn(m, i_, dtype=dt, device=dev) for k, (i_, _) in layer.items()}

            def chain(xs=xs, weights=weights) -> None:
                for k, w in weights.items():
                    torch.nn.functional.linear(xs[k], w)

            ms = time_ms(chain, dev)
            flops = 2 * m * sum(i_ * o for i_, o in layer.values())
            tflops = flops / ms / 1e9
            report["layer"][f"{blas}/{m}"] = {"ms": ms, "tflops": tflops, "bound_tok_s": tflops * 1e12 / flops_out}
            print(f"{blas:8s} layer GEMMs M={m:5d}: {ms * 1e3:8.1f} us, {tflops:6.1f} TFLOP/s -> bound "
                  f"{tflops * 1e12 / flops_out:,.0f} tok/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
