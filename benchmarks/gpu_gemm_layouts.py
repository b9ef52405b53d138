"""The weight GEMMs of one decode step by layout, on one CUDA GPU: is cuBLAS's choice for the skinny
decode shapes (M = tokens in the step) at the memory floor, or would another weight layout reach it?

    PYTHONPATH=src python3 benchmarks/gpu_gemm_layouts.py --out $OUT/gemm_layouts.json [--tokens 32,64,128]

llama-3.1-8b shapes with packed projections (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
14336->4096), bf16, 32 layers of distinct weights (L2 is cold for every GEMM, as in a step). Per M and
layout, a CUDA graph of the 128 GEMMs is replayed: ms per step and TB/s of weight bytes. Layouts:
`linear` F.linear(x, W) with W [out, in] (what the engine runs: cuBLAS TN), `matmul_t` x @ Wt with Wt
[in, out] contiguous (cuBLAS NN). Also per shape (M=32), the time of one GEMM inside the graph.
`--blas cublaslt` routes torch's GEMMs through cuBLASLt (`torch.backends.cuda.preferred_blas_library`),
whose heuristics may pick other kernels for the skinny shapes; `default` leaves torch's choice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_profile_decode import _replay_ms

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
LAYERS = 32


def replay_ms(fn, n: int = 20) -> float:
    """fn captured in a CUDA graph, then ms per replay (gpu_profile_decode's timing)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _replay_ms(graph, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default="32,64,128")
    ap.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default")
    args = ap.parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    dev, dt = "cuda", torch.bfloat16
    weights = {k: [torch.randn(o, i, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)] for k, (i, o) in SHAPES.items()}
    total_bytes = sum(w.numel() * 2 for ws in weights.values() for w in ws)
    rows = []
    for layout in ("linear", "matmul_t"):
        ws = weights if layout == "linear" else {k: [w.t().contiguous() for w in v] for k, v in weights.items()}
        for m in (int(t) for t in args.tokens.split(",")):
            xs = {k: torch.randn(m, i, device=dev, dtype=dt) for k, (i, _) in SHAPES.items()}

            def step(ws=ws, xs=xs, layout=layout) -> None:
                for layer in range(LAYERS):
                    for k in SHAPES:
                        w = ws[k][layer]
                        F.linear(xs[k], w) if layout == "linear" else torch.matmul(xs[k], w)

            ms = replay_ms(step)
            row = {"layout": layout, "tokens": m, "ms_per_step": ms, "tb_s": total_bytes / ms / 1e9}
            if m == 32:
                for k in SHAPES:
                    def one(k=k, ws=ws, xs=xs, layout=layout) -> None:
                        for layer in range(LAYERS):
                            w = ws[k][layer]
                            F.linear(xs[k], w) if layout == "linear" else torch.matmul(xs[k], w)

                    row[f"{k}_us"] = 1e3 * replay_ms(one) / LAYERS
            rows.append(row)
            print(json.dumps(row), flush=True)
        if layout == "matmul_t":
            del ws
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "blas": args.blas,
                                    "weight_bytes": total_bytes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
