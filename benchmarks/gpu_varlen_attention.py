"""Paged attention of a mixed step on one CUDA GPU: the one-launch Triton kernel
(kernels/varlen_attention_triton.py) against the current path (the Triton decode kernel for the decode
tokens + one SDPA per prefill chunk, kernels/attention.py with triton_decode=True), Llama-3.1-8B attention
shape (H = 32, Hkv = 8, D = 128), bfloat16 cache, block_size 16.

Cells (decode tokens first, as the engine lays them out):
  a: 32 decode tokens, context 256        b: 256 decode tokens, context 256
  c: 254 decode (ctx 256) + 2 prefill chunks of 128 from position 0
  d: 30 decode (ctx 256) + 1 prefill of 128 from 0         e: one prefill of 2048 from 0

Per cell:
1. Correctness: varlen vs the current path (both bf16, max abs error < 2e-2) and, for cells with at most
   512 tokens, vs the float64 reference. Any miss: exit 1.
2. Time per call (triton.testing.do_bench median, cold L2), microseconds:
   - `varlen`: the op called eagerly; `varlen_graph`: one call captured in a CUDA graph, replayed;
   - `current`: decode kernel + per-chunk SDPA (attention only, no K/V write), eager (it cannot be
     captured when the step has a prefill chunk: the chunk list is host data);
   - `current_decode_graph`: for pure-decode cells, the decode kernel alone in a CUDA graph (what the
     engine replays today); `meta_build_ms`: AttentionMetadata.build on the host, which the current path
     needs every step.
3. The kernel's `TUNING` variants (seq_search binary/vector x prefetch_table off/on), graph replay, twice
   interleaved; each must give the default's output bit for bit.
4. Sweep (graph replay only, eager too with --sweep-eager; cells of --sweep-cells), to check the shape
   heuristics (`default_block_m`, `default_num_warps`) and Triton's pipelining depth: pure-decode cells:
   block_m 4 tokens per program (16 rows) x num_warps 4/8 x block_n 64/128 x num_stages 2/3/4, single
   pass (split-K was slower at these shapes: RESULTS.md 2026-11-29); cells with prefill chunks:
   block_m 4/16 x num_warps 4 x block_n 64/128 x num_stages 2/3/4.

    PYTHONPATH=src python3 benchmarks/gpu_varlen_attention.py --out $OUT/gpu_varlen_attention.json

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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Cell:
    name: str
    q_lens: list[int]
    kv_lens: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.q_lens)


def cells(dry_run: bool) -> list[Cell]:
    """The five cells; tiny ones for --dry-run (same structure)."""
    ctx, pre, big = (20, 8, 24) if dry_run else (256, 128, 2048)
    n_a, n_b, n_c, n_d = (3, 6, 5, 3) if dry_run else (32, 256, 254, 30)
    return [
        Cell("a_32dec_ctx256", [1] * n_a, [ctx] * n_a),
        Cell("b_256dec_ctx256", [1] * n_b, [ctx] * n_b),
        Cell("c_254dec_2x128pre", [1] * n_c + [pre, pre], [ctx] * n_c + [pre, pre]),
        Cell("d_30dec_1x128pre", [1] * n_d + [pre], [ctx] * n_d + [pre]),
        Cell("e_1x2048pre", [big], [big]),
    ]


def import_kernels() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """The attention modules, without running lorascope/__init__ (the engine's imports need packages the
    device image may lack; the kernels import nothing else of lorascope)."""
    if "lorascope" not in sys.modules:
        pkg = types.ModuleType("lorascope")
        pkg.__path__ = [str(ROOT / "src" / "lorascope")]
        sys.modules["lorascope"] = pkg
    return (
        importlib.import_module("lorascope.kernels.attention"),
        importlib.import_module("lorascope.kernels.attention_triton"),
        importlib.import_module("lorascope.kernels.varlen_attention_triton"),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, Triton interpreter (with --device cpu)")
    ap.add_argument("--cells", nargs="+", default=None, help="cell name prefixes (a b c d e)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--sweep-eager", action="store_true", help="time each sweep config eagerly too (slower)")
    ap.add_argument("--sweep-cells", nargs="+", default=None, help="cell name prefixes to sweep (default: all run)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.dry_run:
        ap.error("--device cpu needs --dry-run (the kernel runs on the CPU only under the interpreter)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (no effect if it already is)
        if args.device == "cuda":
            print("--dry-run runs on the CPU: --device cuda ignored", file=sys.stderr)
            args.device = "cpu"

    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    katt, kdec, kvar = import_kernels()

    if args.dry_run:
        heads, kv_heads, head_dim = 4, 2, 32
        decode_grid = [(4, 4, 16, None, st) for st in (None, 2)]
        mixed_grid = [(bm, 4, 16, "auto", None) for bm in (1, 4)]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --device cpu --dry-run on the CPU)", file=sys.stderr)
            return 2
        heads, kv_heads, head_dim = 32, 8, 128
        decode_grid = [(4, nw, bn, None, st) for nw in (4, 8) for bn in (64, 128) for st in (2, 3, 4)]
        mixed_grid = [(bm, 4, bn, "auto", st) for bm in (4, 16) for bn in (64, 128) for st in (2, 3, 4)]
    device, dtype, block_size = args.device, torch.bfloat16, 16
    scale = head_dim**-0.5
    graphs = device == "cuda" and not args.no_graph
    chosen = [c for c in cells(args.dry_run) if args.cells is None or any(c.name.startswith(p) for p in args.cells)]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def bench(fn) -> float:
        """Median milliseconds per call (cold L2)."""
        if args.dry_run:
            fn()
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def graph_of(fn):
        fn()
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    gen = torch.Generator().manual_seed(0)
    rows, sweep, failures = [], [], []
    for cell in chosen:
        seqs, tokens = len(cell.q_lens), cell.tokens
        need = [-(-n // block_size) for n in cell.kv_lens]
        num_blocks = sum(need) + 8
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        tables, used = [], 0
        for nb in need:
            tables.append(perm[used : used + nb])
            used += nb
        k_cache = (torch.randn(num_blocks * block_size, kv_heads, head_dim, device=device) * 0.5).to(dtype)
        v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, device=device).to(dtype)
        q = torch.randn(tokens, heads, head_dim, device=device).to(dtype)
        meta = kvar.varlen_metadata(cell.q_lens, cell.kv_lens, tables, block_size, seqs, device)
        vargs = (q, k_cache, v_cache, meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables, scale, block_size)
        out = torch.zeros_like(q)

        def varlen(vargs=vargs, out=out) -> torch.Tensor:
            return kvar.paged_varlen_attention(*vargs, out=out)

        # the current path: AttentionMetadata (host), decode kernel over the decode tokens, SDPA per chunk
        start = time.perf_counter()
        ameta = katt.AttentionMetadata.build(
            cell.q_lens, cell.kv_lens, tables, block_size, None, torch.device(device), triton_decode=True
        )
        sync()
        build_ms = 1e3 * (time.perf_counter() - start)
        cur_out = torch.empty_like(q)

        def current(ameta=ameta, q=q, k_cache=k_cache, v_cache=v_cache, cur_out=cur_out) -> torch.Tensor:
            if ameta.decode_lens is not None:
                bd = ameta.decode_lens.shape[0]
                kdec.paged_decode_attention(q[:bd], k_cache, v_cache, ameta.decode_tables, ameta.decode_lens, scale,
                                            block_size, out=cur_out[:bd])  # fmt: skip
            for chunk in ameta.prefills:
                end = chunk.start + chunk.q_len
                qp = q[chunk.start : end].transpose(0, 1).unsqueeze(0)
                kp = k_cache[chunk.kv_rows].transpose(0, 1).unsqueeze(0)
                vp = v_cache[chunk.kv_rows].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(
                    qp, kp, vp, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True
                )
                cur_out[chunk.start : end] = op[0].transpose(0, 1)
            return cur_out

        got = varlen().clone()
        ref_cur = current().clone()
        err_cur = (got.float() - ref_cur.float()).abs().max().item()
        row: dict = {"cell": cell.name, "tokens": tokens, "sequences": seqs, "meta_build_ms": build_ms}
        row["max_err_vs_current"] = err_cur
        if err_cur >= 2e-2:
            failures.append(f"{cell.name}: varlen vs current path max abs error {err_cur:.2e}")
        if tokens <= 512:
            ref64 = kvar.reference_varlen_attention(*vargs)
            err64 = (got.double().cpu() - ref64).abs().max().item()
            row["max_err_vs_fp64"] = err64
            if err64 >= 2e-2:
                failures.append(f"{cell.name}: varlen vs float64 reference max abs error {err64:.2e}")

        row["varlen_ms"] = bench(varlen)
        row["current_ms"] = bench(current)
        if graphs:
            graph = graph_of(varlen)
            out.zero_()
            graph.replay()
            sync()
            diff = (out.float() - got.float()).abs().max().item()
            if diff > 0:
                failures.append(f"{cell.name}: graph replay differs from the eager call by {diff:.2e}")
            row["varlen_graph_ms"] = bench(graph.replay)
            del graph
            if not ameta.prefills:
                dgraph = graph_of(current)
                row["current_decode_graph_ms"] = bench(dgraph.replay)
                del dgraph
        # the kernel's TUNING variants (sequence search x block-table prefetch), graph replay, interleaved twice
        for _ in range(2 if graphs else 1):  # without graphs: the equality check only
            for search in ("binary", "vector"):
                for prefetch in (False, True):

                    def tuned(search=search, prefetch=prefetch, vargs=vargs, out=out) -> torch.Tensor:
                        return kvar.paged_varlen_attention(*vargs, out=out, seq_search=search, prefetch_table=prefetch)

                    res = tuned().clone()
                    if not torch.equal(res, got):
                        failures.append(f"{cell.name} seq_search={search} prefetch={prefetch}: differs from default")
                    if graphs:
                        graph = graph_of(tuned)
                        key = f"tuning_{search}_{'prefetch' if prefetch else 'noprefetch'}_graph_ms"
                        row.setdefault(key, []).append(bench(graph.replay))
                        del graph
        rows.append(row)
        print(f"{cell.name}: varlen {row['varlen_ms'] * 1e3:.1f} us, current {row['current_ms'] * 1e3:.1f} us, "
              f"err vs current {err_cur:.1e}", file=sys.stderr)  # fmt: skip

        if not args.no_sweep and (args.sweep_cells is None or any(cell.name.startswith(p) for p in args.sweep_cells)):
            configs = decode_grid if all(n == 1 for n in cell.q_lens) else mixed_grid
            for block_m, num_warps, block_n, partition, stages in configs:

                def call(block_m=block_m, num_warps=num_warps, block_n=block_n, partition=partition, stages=stages,
                         vargs=vargs):  # fmt: skip
                    return kvar.paged_varlen_attention(
                        *vargs, block_m=block_m, num_warps=num_warps, block_n=block_n, partition_size=partition,
                        num_stages=stages,
                    )  # fmt: skip

                res = call()
                diff = (res.float() - got.float()).abs().max().item()
                tag = f"block_m={block_m} num_warps={num_warps} block_n={block_n} partition={partition} stages={stages}"
                if diff > 2e-2:
                    failures.append(f"{cell.name} {tag}: differs from the default by {diff:.2e}")
                entry = {"cell": cell.name, "block_m": block_m, "num_warps": num_warps, "block_n": block_n,
                         "partition": partition, "num_stages": stages}  # fmt: skip
                if args.sweep_eager or not graphs:
                    entry["ms"] = bench(call)
                if graphs:
                    graph = graph_of(call)
                    entry["graph_ms"] = bench(graph.replay)
                    del graph
                sweep.append(entry)
        del k_cache, v_cache, q, out, cur_out
        if device == "cuda":
            torch.cuda.empty_cache()

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
        "dry_run": args.dry_run,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "block_size": block_size,
        "dtype": "bfloat16",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "sweep": sweep, "failures": failures}, indent=1))

    print(f"\nmixed-step paged attention, H={heads} Hkv={kv_heads} D={head_dim} bf16 block {block_size}; "
          "us per call (do_bench median, cold L2)")  # fmt: skip
    print(
        f"{'cell':<20} {'T':>5} {'S':>4} {'varlen':>8} {'graph':>8} {'current':>8} {'cur_dec_graph':>13} {'build':>8}"
    )

    def us(row: dict, key: str, width: int = 8) -> str:
        return f"{row[key] * 1e3:{width}.1f}" if key in row else f"{'-':>{width}}"

    for r in rows:
        print(f"{r['cell']:<20} {r['tokens']:>5} {r['sequences']:>4} {us(r, 'varlen_ms')} {us(r, 'varlen_graph_ms')} "
              f"{us(r, 'current_ms')} {us(r, 'current_decode_graph_ms', 13)} {us(r, 'meta_build_ms')}")  # fmt: skip
    print("current: decode kernel + per-chunk SDPA, eager (attention only); cur_dec_graph: the decode kernel in a "
          "CUDA graph (pure-decode cells); build: AttentionMetadata.build on the host (current path, every step)")  # fmt: skip
    tuning = [k for k in (rows[0] if rows else {}) if k.startswith("tuning_")]
    if tuning:
        print("\nTUNING variants, graph replay, us per call (two interleaved runs)")
        for r in rows:
            print(f"  {r['cell']:<20} " + "  ".join(f"{k[7:-9]} {'/'.join(f'{x * 1e3:.1f}' for x in r[k])}" for k in tuning))
    if sweep:
        print("\nsweep (us per call, eager / graph replay)")
        for s in sweep:
            graph_us = f"{s['graph_ms'] * 1e3:8.1f}" if "graph_ms" in s else f"{'-':>8}"
            eager_us = f"{s['ms'] * 1e3:8.1f}" if "ms" in s else f"{'-':>8}"
            print(f"  {s['cell']:<20} block_m={s['block_m']!s:>4} warps={s['num_warps']!s:>4} "
                  f"block_n={s['block_n']!s:>4} partition={s['partition']!s:>5} stages={s['num_stages']!s:>4}: "
                  f"{eager_us} {graph_us}")  # fmt: skip
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall checks passed; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
