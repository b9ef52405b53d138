"""The decode step's latency-bound kernels, one at a time, as a c=32 step of the Llama-3.1-8B shape runs them:
paged varlen attention (32 decode tokens, contexts 192 and 256, H 32 / Hkv 8 / D 128, bf16, blocks of 16)
and the q + v LoRA launch pair (32 single-token segments on 32 rank-16 adapters of a 512-slot store).

    PYTHONPATH=src python3 benchmarks/gpu_kernel_probe.py --out $OUT/probe.json          # time the variants
    ncu --clock-control none -k regex:'_varlen|_shrink_multi|_expand_multi' --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section LaunchStats \
        python3 benchmarks/gpu_kernel_probe.py --ncu                                     # counters of the defaults

Timing: per variant, 32 calls on 32 layers' distinct tensors (L2 holds none of them, as in a step) are
captured in one CUDA graph and replayed; microseconds per call, the inter-kernel gap included. Every
variant's output is checked against the default's (attention: max abs error < 2e-2; LoRA: the float32
torch reference, relative error < 2e-2). `--ncu` runs each default kernel a few times eagerly, untimed,
for a profiler to attach to. `--dry-run`: the same variants and checks at tiny shapes on the CPU under
Triton's interpreter (2 layers, no graphs, no timing): catches a broken variant before device time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_varlen_attention import import_kernels

LAYERS = 32
DEV = "cuda"
# the shapes: Llama-3.1-8B's, or tiny ones for --dry-run
SHAPE = {"seqs": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "fan_in": 4096, "q_out": 4096, "v_out": 1024,
         "slots": 512, "ctxs": (192, 256), "max_blocks": 128}
TINY = {"seqs": 3, "heads": 4, "kv_heads": 2, "head_dim": 16, "fan_in": 64, "q_out": 64, "v_out": 32, "slots": 12,
        "ctxs": (40,), "max_blocks": 4}
ATTN_VARIANTS: list[dict] = [
    {},
    {"block_n": 32},
    {"block_n": 32, "num_warps": 2},
    {"block_n": 16, "num_warps": 2},
    {"block_n": 64, "num_warps": 8},
    {"block_n": 128, "num_warps": 8},
    {"block_n": 64, "num_stages": 1},
    {"block_n": 32, "num_stages": 1},
    {"block_n": 32, "num_stages": 3},
    {"partition_size": 64},
    {"partition_size": 128},
    {"block_n": 32, "num_warps": 2, "partition_size": 64},
    {"block_n": 32, "num_warps": 2, "partition_size": 32},
    {"table_in_registers": True},
    {"prefetch_kv": True},
    {"table_in_registers": True, "prefetch_kv": True},
    {"block_n": 32, "table_in_registers": True, "prefetch_kv": True},
    {"block_n": 64, "num_warps": 8, "table_in_registers": True, "prefetch_kv": True},
]
LORA_VARIANTS: list[dict] = [
    {},
    {"split_k": 1},
    {"split_k": 2},
    {"split_k": 8},
    {"split_k": 16},
    {"block_n": 64},
    {"block_n": 256},
    {"split_k": 8, "block_n": 256},
    {"split_k": 16, "block_n": 256},
    {"split_k": 16, "block_n": 64},
]


def replay_us(fn, calls: int, n: int = 30) -> float:
    if DEV == "cpu":  # --dry-run: checks only
        fn()
        return float("nan")
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n / calls)
    del graph
    return min(times)


def attention_cases(kvar, ctx: int) -> tuple[list, list]:
    """32 layers' (q, k_cache, v_cache) and the shared metadata, for 32 decodes of context ctx."""
    seqs, heads, kv_heads, head_dim, block_size = SHAPE["seqs"], SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"], 16
    need = -(-ctx // block_size)
    num_blocks = seqs * need + 8
    gen = torch.Generator().manual_seed(ctx)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [perm[i * need : (i + 1) * need] for i in range(seqs)]
    # the engine's table width: max_model_len 2048 / 16
    meta = kvar.varlen_metadata([1] * seqs, [ctx] * seqs, tables, block_size, seqs, DEV, max_blocks=SHAPE["max_blocks"])
    layers = []
    for _ in range(LAYERS):
        k = (torch.randn(num_blocks * block_size, kv_heads, head_dim, device=DEV) * 0.5).bfloat16()
        v = torch.randn(num_blocks * block_size, kv_heads, head_dim, device=DEV).bfloat16()
        q = torch.randn(seqs, heads, head_dim, device=DEV).bfloat16()
        layers.append((q, k, v, torch.empty_like(q)))
    return layers, [meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables]


def lora_cases(ktri):
    fan_in, shapes, slots, rank = SHAPE["fan_in"], {"q_proj": SHAPE["q_out"], "v_proj": SHAPE["v_out"]}, SHAPE["slots"], 16
    seqs = SHAPE["seqs"]
    segments = [(i, i + 1, i * (slots // seqs)) for i in range(seqs)]
    ranks = {m: [rank] * slots for m in shapes}
    scales = {m: [2.0] * slots for m in shapes}
    meta = ktri.LoRAMeta.build([], ranks, scales, DEV, capacity=seqs, max_len_bound=seqs)
    meta.update(segments, ranks, scales)
    active = [s for _, _, s in segments]
    gen = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(seqs, fan_in, device=DEV, generator=gen).bfloat16()
    layers = []
    for _ in range(LAYERS):
        w = {}
        for m, n in shapes.items():
            a = torch.zeros((slots, rank, fan_in), dtype=torch.bfloat16, device=DEV)
            b = torch.zeros((slots, n, rank), dtype=torch.bfloat16, device=DEV)
            a[active] = (torch.randn(seqs, rank, fan_in, generator=gen, device=DEV) * fan_in**-0.5).bfloat16()
            b[active] = (torch.randn(seqs, n, rank, generator=gen, device=DEV) * rank**-0.5).bfloat16()
            w[m] = (a, b, torch.zeros(seqs, n, dtype=torch.bfloat16, device=DEV))
        layers.append(w)
    return x, layers, meta, active


def lora_reference(x, w, active):
    out = {}
    for m, (a, b, _) in w.items():
        u = torch.einsum("tk,trk->tr", x.float(), a[active].float()) * 2.0
        out[m] = torch.einsum("tr,tnr->tn", u.bfloat16().float(), b[active].float())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ncu", action="store_true", help="run the default kernels eagerly for ncu; no timing")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton's interpreter: checks only")
    args = ap.parse_args()
    global DEV, LAYERS
    if args.dry_run:
        DEV, LAYERS = "cpu", 2
        SHAPE.update(TINY)
    if not args.ncu and args.out is None:
        ap.error("--out is needed unless --ncu")
    _katt, _kdec, kvar = import_kernels()
    import importlib

    ktri = importlib.import_module("lorascope.kernels.lora_triton")
    scale = SHAPE["head_dim"] ** -0.5
    rows, failures = [], []
    for ctx in SHAPE["ctxs"]:
        layers, meta = attention_cases(kvar, ctx)
        ref = None
        for variant in [{}] if args.ncu else ATTN_VARIANTS:

            def step(variant=variant, layers=layers, meta=meta) -> None:
                for q, k, v, o in layers:
                    kvar.paged_varlen_attention(q, k, v, *meta, scale, 16, out=o, **variant)

            if args.ncu:
                for _ in range(3):
                    kvar.paged_varlen_attention(*layers[0][:3], *meta, scale, 16, out=layers[0][3])
                torch.cuda.synchronize()
                continue
            step()
            got = layers[0][3].float().clone()
            if ref is None:
                ref = got
            err = (got - ref).abs().max().item()
            if err > 2e-2:
                failures.append(f"attention ctx {ctx} {variant}: differs from the default by {err:.2e}")
            us = replay_us(step, LAYERS)
            rows.append({"kernel": "attention", "ctx": ctx, **variant, "us_per_call": us, "max_err": err})
            print(json.dumps(rows[-1]), flush=True)
        del layers
        torch.cuda.empty_cache()

    x, layers, meta, active = lora_cases(ktri)
    want = lora_reference(x, layers[0], active)
    for variant in [{}] if args.ncu else LORA_VARIANTS:

        def lstep(variant=variant) -> None:
            for w in layers:
                ktri.lora_multi_triton(x, [(w[m][2], w[m][0], w[m][1], meta[m]) for m in ("q_proj", "v_proj")], **variant)

        if args.ncu:
            for _ in range(3):
                ktri.lora_multi_triton(x, [(layers[0][m][2], layers[0][m][0], layers[0][m][1], meta[m])
                                           for m in ("q_proj", "v_proj")])
            torch.cuda.synchronize()
            continue
        for w in layers:
            for m in w:
                w[m][2].zero_()
        ktri.lora_multi_triton(x, [(layers[0][m][2], layers[0][m][0], layers[0][m][1], meta[m]) for m in ("q_proj", "v_proj")],
                               **variant)
        err = max(((layers[0][m][2].float() - want[m]).norm() / want[m].norm()).item() for m in want)
        if err > 2e-2:
            failures.append(f"lora {variant}: relative error {err:.2e} against the reference")
        us = replay_us(lstep, LAYERS)
        plan = ktri.launch_plan(SHAPE["seqs"], SHAPE["fan_in"], [SHAPE["q_out"], SHAPE["v_out"]], meta["q_proj"], **variant)
        rows.append({"kernel": "lora_qv", **variant, "us_per_call": us, "rel_err": err, "split": plan.split,
                     "programs": plan.programs})
        print(json.dumps(rows[-1]), flush=True)
    if args.ncu:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (Triton interpreter, tiny shapes)"
    args.out.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                    "rows": rows, "failures": failures}, indent=1))
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
