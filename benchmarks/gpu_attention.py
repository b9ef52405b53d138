"""Paged decode attention on one CUDA GPU: the Triton kernel (kernels/attention_triton.py) against the
engine's torch path (kernels/attention.py `paged_attention`, decode), Llama-3.1-8B attention shape
(H = 32, Hkv = 8, D = 128), bfloat16 cache, block_size 16.

Cells: B in {32, 256} sequences decoding one token each, every sequence with the same context length
in {256, 1024} (the new token included), blocks drawn from a shuffled pool (non-contiguous), the block
table exactly as wide as the context (`table=ctx`) or as wide as an 8192-token max_model_len
(`table=8192`: what a CUDA graph bucket sees; only the Triton kernel reads the table, so only it gets
those rows).

1. Correctness, per cell: the Triton output against the torch path (both bf16) and against the float64
   reference for the first 8 sequences (max abs error < 2e-2). Any miss: exit 1.
2. Time per call: triton.testing.do_bench, median, L2 flushed before each call (cold cache; a step's 32
   layers stream far more than L2 between two calls of one layer):
   - `triton`: the op called eagerly (its launch is in the timed region when the host is slower than the GPU);
   - `triton_graph`: one call captured in a CUDA graph, replayed (static inputs, no host work);
   - `torch`: `paged_attention` with its AttentionMetadata prebuilt (gather + SDPA + the K/V write of
     the new tokens); the host cost of `AttentionMetadata.build`, which it needs every step, apart.
3. Bytes: K and V of every context token once (B x ctx x Hkv x D x 2 x 2 bytes) + q + out; achieved
   bandwidth = those bytes / time, against ~4.8 TB/s (H200 HBM3e peak; ~4.3 TB/s measured copy).
4. Eager back-to-back calls: wall time per call (host launch cost included), Triton and torch.
5. Sweep of the Triton kernel's split-K partition (single pass, 64..512 tokens) and block_n (32, 64),
   table=ctx and table=8192, so `default_partition`'s heuristic can be checked.

    PYTHONPATH=src python3 benchmarks/gpu_attention.py --out $OUT/gpu_attention.json

--dry-run (with --device cpu): tiny shapes on the CPU under Triton's interpreter (checks only; the
timings mean nothing, no graphs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HBM_TBS = 4.8


def import_kernels() -> tuple[types.ModuleType, types.ModuleType]:
    """The two attention modules, without running lorascope/__init__ (the engine's imports need packages
    the device image may lack; the kernels import nothing else of lorascope)."""
    if "lorascope" not in sys.modules:
        pkg = types.ModuleType("lorascope")
        pkg.__path__ = [str(ROOT / "src" / "lorascope")]
        sys.modules["lorascope"] = pkg
    return (importlib.import_module("lorascope.kernels.attention"),
            importlib.import_module("lorascope.kernels.attention_triton"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, Triton interpreter (with --device cpu)")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.dry_run:
        ap.error("--device cpu needs --dry-run (the kernel runs on the CPU only under the interpreter)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        if args.device == "cuda":
            print("--dry-run runs on the CPU: --device cuda ignored", file=sys.stderr)
            args.device = "cpu"

    import torch
    import triton
    from triton.testing import do_bench

    katt, ktri = import_kernels()
    AttentionMetadata, paged_attention = katt.AttentionMetadata, katt.paged_attention
    paged_decode_attention, reference = ktri.paged_decode_attention, ktri.reference_decode_attention

    if args.dry_run:
        heads, kv_heads, head_dim = 4, 2, 32
        batches, contexts, wide_table = (2, 3), (20, 40), 128
        partitions, block_ns = (None, 16, 32), (16,)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --device cpu --dry-run on the CPU)", file=sys.stderr)
            return 2
        heads, kv_heads, head_dim = 32, 8, 128
        batches, contexts, wide_table = (32, 256), (256, 1024), 8192
        partitions, block_ns = (None, 64, 128, 256, 512), (32, 64)
    batches = tuple(args.batches or batches)
    contexts = tuple(args.contexts or contexts)
    device, dtype, elt, block_size = args.device, torch.bfloat16, 2, 16
    scale = head_dim**-0.5
    graphs = device == "cuda" and not args.no_graph

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def bench(fn, warmup: int = 25, rep: int = 100) -> float:
        """Median milliseconds per call (cold L2)."""
        if args.dry_run:
            fn()
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def eager_wall(fn, calls: int = 200) -> float:
        """Wall milliseconds per call, back to back, launch cost included."""
        calls = 2 if args.dry_run else calls
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return 1e3 * (time.perf_counter() - start) / calls

    gen = torch.Generator().manual_seed(0)
    rows, sweep, failures = [], [], []
    for batch in batches:
        for ctx in contexts:
            need = -(-ctx // block_size)
            num_blocks = batch * need + 8
            perm = torch.randperm(num_blocks, generator=gen)
            tables = perm[: batch * need].reshape(batch, need)
            k_cache = (torch.randn(num_blocks * block_size, kv_heads, head_dim, device=device) * 0.5).to(dtype)
            v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, device=device).to(dtype)
            q = torch.randn(batch, heads, head_dim, device=device).to(dtype)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            wide_blocks = max(need, wide_table // block_size)
            bt = {"ctx": tables.to(device=device, dtype=torch.int32),
                  str(wide_table): torch.cat([tables, perm[-1:].expand(batch, wide_blocks - need)], 1).to(
                      device=device, dtype=torch.int32)}
            out = torch.empty_like(q)
            kv_bytes = 2 * batch * ctx * kv_heads * head_dim * elt
            io_bytes = kv_bytes + 2 * q.numel() * elt
            cell = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes, "bytes": io_bytes}

            def gbs(ms: float, nbytes: int = io_bytes) -> float:
                return nbytes / (ms * 1e-3) / 1e9

            # torch path: the engine's metadata (host) and its decode (device)
            host_tables = tables.tolist()
            start = time.perf_counter()
            meta = AttentionMetadata.build([1] * batch, [ctx] * batch, host_tables, block_size, None,
                                           torch.device(device))
            sync()
            build_ms = 1e3 * (time.perf_counter() - start)
            new_rows = meta.slot_mapping
            k_new, v_new = k_cache[new_rows].clone(), v_cache[new_rows].clone()

            def torch_call(meta=meta, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, q=q):
                return paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale)

            # correctness
            got = paged_decode_attention(q, k_cache, v_cache, bt["ctx"], seq_lens, scale, block_size, out=out)
            got_wide = paged_decode_attention(q, k_cache, v_cache, bt[str(wide_table)], seq_lens, scale, block_size)
            ref_torch = torch_call()
            first = min(batch, 8)
            ref64 = reference(q[:first], k_cache, v_cache, bt["ctx"][:first], seq_lens[:first], scale, block_size)
            err_torch = (got.float() - ref_torch.float()).abs().max().item()
            err_ref = (got[:first].double().cpu() - ref64).abs().max().item()
            err_wide = (got_wide.float() - got.float()).abs().max().item()
            cell.update(max_err_vs_torch=err_torch, max_err_vs_fp64=err_ref, max_err_wide_table=err_wide)
            if not (err_torch < 2e-2 and err_ref < 2e-2 and err_wide < 2e-2):
                failures.append(f"B={batch} ctx={ctx}: errors vs torch {err_torch:.2e}, vs fp64 {err_ref:.2e}, "
                                f"wide table {err_wide:.2e}")

            cell["torch_meta_build_ms"] = build_ms
            cell["torch_ms"] = bench(torch_call)
            cell["torch_eager_wall_ms"] = eager_wall(torch_call)
            for table_name, table in bt.items():
                def call(table=table, q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, out=out):
                    return paged_decode_attention(q, k_cache, v_cache, table, seq_lens, scale, block_size, out=out)

                tag = "" if table_name == "ctx" else f"_table{table_name}"
                cell[f"triton{tag}_ms"] = bench(call)
                cell[f"triton{tag}_eager_wall_ms"] = eager_wall(call)
                if graphs:
                    call()
                    sync()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        call()
                    graph.replay()
                    sync()
                    diff = (out.float() - got.float()).abs().max().item()
                    if diff > 2e-2:
                        failures.append(f"B={batch} ctx={ctx} table={table_name}: graph replay differs by {diff:.2e}")
                    cell[f"triton_graph{tag}_ms"] = bench(graph.replay)
                    del graph
            for key in [k for k in cell if k.endswith("_ms") and "wall" not in k and "build" not in k]:
                cell[key.replace("_ms", "_gbs")] = gbs(cell[key])
            cell["triton_pct_of_hbm"] = 100 * cell["triton_gbs"] / (HBM_TBS * 1e3)
            rows.append(cell)
            print(f"B={batch} ctx={ctx}: triton {cell['triton_ms'] * 1e3:.1f} us ({cell['triton_gbs']:.0f} GB/s), "
                  f"torch {cell['torch_ms'] * 1e3:.1f} us, err vs torch {err_torch:.1e}", file=sys.stderr)

            if not args.no_sweep:
                for table_name, table in bt.items():
                    for block_n in block_ns:
                        for partition in partitions:
                            if partition is not None and (partition % block_n or partition > table.shape[1] * block_size):
                                continue

                            def call(table=table, partition=partition, block_n=block_n, q=q, k_cache=k_cache,
                                     v_cache=v_cache, seq_lens=seq_lens):
                                return paged_decode_attention(q, k_cache, v_cache, table, seq_lens, scale, block_size,
                                                              partition_size=partition, block_n=block_n)

                            res = call()
                            diff = (res.float() - got.float()).abs().max().item()
                            if diff > 2e-2:
                                failures.append(f"B={batch} ctx={ctx} table={table_name} partition={partition} "
                                                f"block_n={block_n}: differs from the default by {diff:.2e}")
                            entry = {"batch": batch, "context": ctx, "table": table_name, "block_n": block_n,
                                     "partition": partition, "ms": bench(call)}
                            if graphs:  # the device time alone (split-K's second launch and buffers cost host time)
                                sync()
                                graph = torch.cuda.CUDAGraph()
                                with torch.cuda.graph(graph):
                                    call()
                                entry["graph_ms"] = bench(graph.replay)
                                del graph
                            entry["gbs"] = gbs(entry.get("graph_ms", entry["ms"]))
                            sweep.append(entry)
            del k_cache, v_cache, meta, ref_torch
            if device == "cuda":
                torch.cuda.empty_cache()

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
           "dry_run": args.dry_run, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "block_size": block_size, "dtype": "bfloat16", "hbm_tbs": HBM_TBS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "sweep": sweep, "failures": failures}, indent=1))

    print(f"\npaged decode attention, H={heads} Hkv={kv_heads} D={head_dim} bf16 block {block_size}; "
          f"us per call (do_bench median, cold L2); GB/s = K/V+q+out bytes / time; % of {HBM_TBS} TB/s")
    head = (f"{'B':>4} {'ctx':>5} {'MB':>7} {'triton':>8} {'GB/s':>6} {'%HBM':>5} {'graph':>8} {'GB/s':>6} "
            f"{'t8192':>8} {'g8192':>8} {'torch':>8} {'GB/s':>6} {'build':>8} {'eagerT':>8} {'eagerTo':>8}")
    print(head)

    def us(row: dict, key: str) -> str:
        return f"{row[key] * 1e3:8.1f}" if key in row else f"{'-':>8}"

    for r in rows:
        wide = f"_table{wide_table}"
        graph_gbs = f"{r['triton_graph_gbs']:6.0f}" if "triton_graph_gbs" in r else f"{'-':>6}"
        print(f"{r['batch']:>4} {r['context']:>5} {r['bytes'] / 1e6:7.1f} {us(r, 'triton_ms')} {r['triton_gbs']:6.0f} "
              f"{r['triton_pct_of_hbm']:5.1f} {us(r, 'triton_graph_ms')} {graph_gbs} {us(r, f'triton{wide}_ms')} "
              f"{us(r, f'triton_graph{wide}_ms')} {us(r, 'torch_ms')} {r['torch_gbs']:6.0f} "
              f"{us(r, 'torch_meta_build_ms')} {us(r, 'triton_eager_wall_ms')} {us(r, 'torch_eager_wall_ms')}")
    print("t8192/g8192: block table 8192 tokens wide (plain / graph); build: AttentionMetadata.build on the host "
          "(torch path, every step); eagerT/eagerTo: back-to-back wall time per call, Triton / torch")
    if sweep:
        print("\nsweep (us per call, plain / graph replay; GB/s from the graph): partition None = single pass")
        for s in sweep:
            graph_us = f"{s['graph_ms'] * 1e3:8.1f}" if "graph_ms" in s else f"{'-':>8}"
            print(f"  B={s['batch']:>4} ctx={s['context']:>5} table={s['table']:>5} block_n={s['block_n']:>3} "
                  f"partition={s['partition']!s:>5}: {s['ms'] * 1e3:8.1f} {graph_us} us {s['gbs']:6.0f} GB/s")
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall checks passed; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
