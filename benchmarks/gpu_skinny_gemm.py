"""The decode step's weight GEMMs: cuBLASLt against the split-K Triton kernel (kernels/gemm_triton.py).

    PYTHONPATH=src python3 benchmarks/gpu_skinny_gemm.py --out $OUT/skinny_gemm.json [--tokens 32,64] [--budget-s 200]

llama-3.1-8b packed shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096), bf16,
32 layers of distinct weights (L2 cold for every GEMM, as in a step); per shape, config and M a CUDA
graph of the 32 GEMMs is replayed (gpu_gemm_layouts.py's method): us per GEMM and TB/s of weight bytes.
Every Triton config is first checked against F.linear (float32 reference; max abs error over the
output's scale). Stage 1 sweeps tiles x splits x operand order at the first M; stage 2 varies warps
and pipeline stages around each shape's best two; stage 3 times each shape's best three at the other Ms.
Prints one JSON row per timing and, per M, the step's GEMM time with cuBLASLt and with the best kernel
per shape. After stage 2 the 32 layers' GEMMs run in a step's order (`chain_ms`: cuBLASLt, then each
shape's best config). Stage 1 stops starting timings at 55% of --budget-s, stage 2 at 75%, stage 3 at
100%; the chain always runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_gemm_layouts import LAYERS, SHAPES, replay_ms
from lorascope.kernels.gemm_triton import GemmConfig, default_config, skinny_linear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default="32,64")
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args()
    t0 = time.monotonic()
    # stage 1 may use 55% of the budget, stage 2 up to 75%; the chain always runs
    deadline = {"t": t0 + 0.55 * args.budget_s}
    torch.backends.cuda.preferred_blas_library("cublaslt")  # what the engine's runner sets
    dev, dt = "cuda", torch.bfloat16
    weights = {s: [torch.randn(o, i, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)] for s, (i, o) in SHAPES.items()}
    tokens = [int(t) for t in args.tokens.split(",")]
    rows: list[dict] = []

    def timed(shape: str, m: int, cfg: GemmConfig | None) -> dict | None:
        if time.monotonic() > deadline["t"]:
            return None
        i = SHAPES[shape][0]
        x = torch.randn(m, i, device=dev, dtype=dt)
        ws = weights[shape]
        row: dict = {"shape": shape, "tokens": m, "kernel": "cublaslt" if cfg is None else "triton"}
        if cfg is not None:
            row["config"] = asdict(cfg)
            try:
                ref = F.linear(x.float(), ws[0].float())
                err = (skinny_linear(x, ws[0], config=cfg).float() - ref).abs().max().item()
            except Exception as e:  # a config Triton cannot build (shared memory, registers)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True)
                return row
            row["rel_err"] = err / ref.abs().max().item()

        def run(x=x, ws=ws, cfg=cfg) -> None:
            for w in ws:
                F.linear(x, w) if cfg is None else skinny_linear(x, w, config=cfg)

        us = 1e3 * replay_ms(run) / LAYERS
        row.update(us=us, tb_s=ws[0].numel() * 2 / us / 1e6)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def ok(r: dict | None) -> bool:
        return r is not None and "us" in r and r["rel_err"] < 2e-2

    best: dict[tuple[str, int], list[dict]] = {}
    m0 = tokens[0]
    found: dict[str, list[dict]] = {shape: [] for shape in SHAPES}
    for shape in SHAPES:
        timed(shape, m0, None)
    # stage 1: tiles x splits x operand order, the likeliest first and every shape in turn, so that a
    # short budget still leaves each shape a few configs
    for block_n, block_k, swap, double in itertools.product((64, 128, 32), (128, 256), (True, False), (False, True)):
        for shape, (k, n) in SHAPES.items():
            s = default_config(m0, n, k, block_n).split_k
            split = min(16, 2 * s) if double else s
            if double and split == s:
                continue
            r = timed(shape, m0, GemmConfig(block_n=block_n, block_k=block_k, split_k=split, swap=swap))
            if ok(r):
                found[shape].append(r)
    deadline["t"] = t0 + 0.75 * args.budget_s
    for shape in SHAPES:  # stage 2: warps and stages around the best two
        for r in sorted(found[shape], key=lambda r: r["us"])[:2]:
            base = GemmConfig(**r["config"])
            for warps, stages in itertools.product((4, 8), (3, 4, 5)):
                if (warps, stages) != (base.num_warps, base.num_stages):
                    r2 = timed(shape, m0, replace(base, num_warps=warps, num_stages=stages))
                    if ok(r2):
                        found[shape].append(r2)
        best[(shape, m0)] = sorted(found[shape], key=lambda r: r["us"])[:3]
    chain = chain_ms(weights, m0, {s: GemmConfig(**best[(s, m0)][0]["config"]) for s in SHAPES if best[(s, m0)]})
    deadline["t"] = t0 + args.budget_s
    for m in tokens[1:]:  # stage 3
        for shape in SHAPES:
            timed(shape, m, None)
            found = [r for c in best[(shape, m0)] if ok(r := timed(shape, m, GemmConfig(**c["config"])))]
            best[(shape, m)] = sorted(found, key=lambda r: r["us"])
    summary = []
    for m in tokens:
        lt = {r["shape"]: r["us"] for r in rows if r["kernel"] == "cublaslt" and r["tokens"] == m}
        tr = {s: best[(s, m)][0]["us"] for s in SHAPES if best.get((s, m))}
        line = {"tokens": m, "cublaslt_step_ms": LAYERS * sum(lt.values()) / 1e3 if len(lt) == 4 else None,
                "best_step_ms": LAYERS * sum(min(lt.get(s, 1e9), tr.get(s, 1e9)) for s in SHAPES) / 1e3,
                "per_shape": {s: {"cublaslt_us": lt.get(s), "triton_us": tr.get(s),
                                  "triton_config": best[(s, m)][0]["config"] if best.get((s, m)) else None} for s in SHAPES}}
        summary.append(line)
        print(json.dumps(line), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"chain_ms": chain}), flush=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "summary": summary, "chain_ms": chain, "rows": rows}, indent=1))


def chain_ms(weights: dict, m: int, cfgs: dict[str, GemmConfig]) -> dict:
    """The 32 layers' GEMMs in a step's order (qkv, o, gate_up, down) in one graph, on fixed inputs of
    their widths (stream order makes each wait for the one before, as in a step): cuBLASLt, then the best
    configs. ms a step."""
    if len(cfgs) != len(SHAPES):
        return {}
    dev, dt = "cuda", torch.bfloat16
    h = SHAPES["qkv"][0]
    x = torch.randn(m, h, device=dev, dtype=dt)
    a = torch.randn(m, SHAPES["o"][0], device=dev, dtype=dt)
    g = torch.randn(m, SHAPES["down"][0], device=dev, dtype=dt)
    res = {}
    for name, triton in (("cublaslt", False), ("triton", True)):
        def run(triton=triton) -> None:
            for i in range(LAYERS):
                for s, inp in (("qkv", x), ("o", a), ("gate_up", x), ("down", g)):
                    w = weights[s][i]
                    if triton:
                        skinny_linear(inp, w, config=cfgs[s])
                    else:
                        F.linear(inp, w)
        try:
            res[name] = replay_ms(run)
        except Exception as e:  # a config that builds alone but not here: say so
            res[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


if __name__ == "__main__":
    main()
