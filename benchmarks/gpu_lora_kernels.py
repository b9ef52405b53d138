"""The Triton grouped LoRA op against torch's `lora_grouped` and the naive gather-per-token bmm, on one
CUDA GPU, Llama-3.1-8B q_proj (4096 -> 4096) and v_proj (4096 -> 1024) shapes, rank 16, bfloat16.

Cells: T in {32, 256} decode tokens (one token per request), active adapters in {1, 8, 32}, the T
tokens spread evenly over them: each active slot owns T/active consecutive tokens, one segment, as the
engine groups them (T = 32 with 32 adapters: 32 single-token segments), S (slots in the store) in
{32, 1024}. Every idle slot's weights are NaN: reading one poisons the result.

1. Correctness, per cell and method: fresh random inputs, y filled with random base values, the result
   against `lora_reference` in float64 (relative error < 1e-2 for bf16, no NaN). Any miss: exit 1.
2. Time per call: triton.testing.do_bench, median, L2 flushed before each call (cold weights, as in a
   real step where 32 layers of base weights flow through L2 between two LoRA calls).
3. Bytes: the fewest any method must move (the active adapters' A and B once + x once + y read and
   written); effective GB/s = those bytes / time, against a measured device-to-device copy.
4. Per step, q + v over 32 layers: the estimate 32 x (t_q + t_v), and (S = 32) a CUDA graph of the
   64 calls over 32 layers' distinct weights, replayed (no launch gaps), for the Triton op and the naive
   bmm (torch's `lora_grouped` builds index tensors on the host every call: it does not capture).
5. Eager back-to-back calls (T = 32, 32 adapters, q_proj): wall time per call with the host's launch
   cost; the host cost of LoRAMeta.build.
6. A small sweep of the Triton op's split_k / block_n (S = 32), so the heuristics can be checked.
7. Engine steps (`--steps`, alone: `--steps-only`): what the engine's CUDA graphs run. Per cell, a
   metadata built as `_capture` builds it (capacity = min(256, bucket), max_len_bound = bucket) and
   `update`d with the step's segments (one adapter each), then a captured graph of 32 layers'
   `lora_multi_triton` q + v launch pairs (distinct weights per layer, 512-slot store, idle slots NaN),
   replayed: us per launch pair, the programs launched (shrink + expand) and the real tiles; "exact":
   the same step with a meta built for it alone (its grid holds just its real tiles, which a graph
   replayed for every step of the bucket cannot). --split-k overrides the split-K heuristic. Cells:
   decode T=32 (32 segments) and T=256 (256), mixed T=160 (30 decode + a 128-token chunk), T=256
   (32 decode + a 224-token chunk) and T=1024 (4 x 256-token prefills). Each cell is first checked
   against torch's `lora_grouped` in float32.

    python benchmarks/gpu_lora_kernels.py --out $OUT/gpu_lora_kernels.json
    python benchmarks/gpu_lora_kernels.py --steps-only --out $OUT/lora_steps.json [--kernels OLD.py]

--kernels FILE: load the Triton module from FILE instead of src/ (an A/B against another version, e.g.
`git show HEAD:src/lorascope/kernels/lora_triton.py > /tmp/old.py`).
--dry-run: tiny shapes on the CPU under Triton's interpreter (checks only; the timings mean nothing).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import types
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_kernels(triton_file: Path | None = None) -> tuple[types.ModuleType, types.ModuleType]:
    """The two kernel modules, without running lorascope/__init__ (the engine's imports need packages
    the device image may lack; the kernels import nothing else of lorascope). triton_file: load the
    Triton module from there instead (an A/B against another version)."""
    if "lorascope" not in sys.modules:
        pkg = types.ModuleType("lorascope")
        pkg.__path__ = [str(ROOT / "src" / "lorascope")]
        sys.modules["lorascope"] = pkg
    kref = importlib.import_module("lorascope.kernels.lora")
    if triton_file is None:
        return kref, importlib.import_module("lorascope.kernels.lora_triton")
    spec = importlib.util.spec_from_file_location("lora_triton_under_test", triton_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return kref, module


# (name, bucket = tokens in the step, segment lengths): the engine's step mixes (--steps)
STEP_CELLS = (
    ("decode T=32", 32, (1,) * 32),
    ("decode T=256", 256, (1,) * 256),
    ("mixed T=160", 160, (1,) * 30 + (128,)),
    ("mixed T=256", 256, (1,) * 32 + (224,)),
    ("prefill T=1024", 1024, (256,) * 4),
)


def engine_steps(torch, kref, ktri, do_bench, dry_run: bool, split_k: int | None = None) -> list[dict]:
    """Cell 7 of the docstring: captured q + v launch pairs with capacity-built metadata, as the engine."""
    device = "cpu" if dry_run else "cuda"
    fan_in, shapes = (96, {"q_proj": 80, "v_proj": 24}) if dry_run else (4096, {"q_proj": 4096, "v_proj": 1024})
    layers, num_slots, rank, scale, dtype = (1, 300, 16, 2.0, torch.bfloat16) if dry_run else (32, 512, 16, 2.0, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(1)
    ranks = {m: [rank] * num_slots for m in shapes}
    scales = {m: [scale] * num_slots for m in shapes}
    knobs = {} if split_k is None else {"split_k": split_k}
    out = []
    for name, bucket, lengths in STEP_CELLS:
        stride = num_slots // len(lengths)
        segments, start = [], 0
        for i, n in enumerate(lengths):  # one adapter per segment, in slot order, back to back
            segments.append((start, start + n, i * stride))
            start += n
        active = [slot for _, _, slot in segments]
        meta = ktri.LoRAMeta.build([], ranks, scales, device, capacity=min(256, bucket), max_len_bound=bucket)
        host_start = time.perf_counter()
        meta.update(segments, ranks, scales)
        update_us = 1e6 * (time.perf_counter() - host_start)
        x = (torch.randn(bucket, fan_in, generator=gen, device=device)).to(dtype)
        ys = {m: torch.randn(bucket, n, generator=gen, device=device).to(dtype) for m, n in shapes.items()}
        ws = []
        for _ in range(layers):
            w = {}
            for m, n in shapes.items():
                a = torch.full((num_slots, rank, fan_in), float("nan"), dtype=dtype, device=device)
                b = torch.full((num_slots, n, rank), float("nan"), dtype=dtype, device=device)
                a[active] = (torch.randn(len(active), rank, fan_in, generator=gen, device=device) * fan_in**-0.5).to(dtype)
                b[active] = (torch.randn(len(active), n, rank, generator=gen, device=device) * rank**-0.5).to(dtype)
                w[m] = (a, b)
            ws.append(w)

        def step(ws=ws, x=x, ys=ys, meta=meta) -> None:
            for w in ws:
                ktri.lora_multi_triton(x, [(ys[m], a, b, meta[m]) for m, (a, b) in w.items()], **knobs)

        y0 = {m: y.clone() for m, y in ys.items()}
        step(ws[:1])  # compiles; checked against torch's lora_grouped (float32)
        errs = {}
        for m, (a, b) in ws[0].items():
            ref = kref.lora_grouped(x.float(), y0[m].float(), a.float(), b.float(), ranks[m], scales[m], segments)
            got = ys[m].float()
            errs[m] = float((got - ref).norm() / (ref - y0[m].float()).norm())
            if torch.isnan(got).any():
                errs[m] = float("nan")
        ok = all(e < 2e-2 for e in errs.values())  # NaN fails too
        row = {"cell": name, "split_k": split_k, "bucket": bucket, "segments": len(segments), "capacity": min(256, bucket),
               "rel_err": errs, "ok": ok, "update_us": update_us, "layers": layers}
        plan = getattr(ktri, "launch_plan", None)
        if plan is not None:
            p = plan(bucket, fan_in, list(shapes.values()), meta[next(iter(shapes))], **knobs)
            row |= {"shrink_programs": p.programs[0], "expand_programs": p.programs[1], "grid_tiles": p.tiles,
                    "real_tiles": int(meta.tiles[0])}
        if not dry_run:
            # the engine's capacity-built meta, then (for scale) one built for this step alone: the grid
            # holds exactly its tiles, what no captured graph can have
            exact = ktri.LoRAMeta.build(segments, ranks, scales, device)
            for key, m in (("us_per_pair", meta), ("exact_grid_us_per_pair", exact)):
                step(meta=m)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step(meta=m)
                row[key] = 1e3 * float(do_bench(graph.replay, warmup=10, rep=200, return_mode="median")) / layers
                del graph
        out.append(row)
        del ws
    return out


def print_steps(rows: list[dict]) -> None:
    print(f"\n{'step (q + v per layer, graph)':32s} {'us/pair':>8s} {'exact':>6s} {'programs (shrink+expand)':>25s} "
          f"{'tiles (grid/real)':>18s} {'update us':>9s} {'rel err':>8s}")
    for r in rows:
        us = (f"{r['us_per_pair']:8.1f} {r['exact_grid_us_per_pair']:6.1f}" if "us_per_pair" in r
              else f"{'-':>8s} {'-':>6s}")
        programs = f"{r['shrink_programs']} + {r['expand_programs']}" if "shrink_programs" in r else "-"
        tiles = f"{r['grid_tiles']}/{r['real_tiles']}" if "grid_tiles" in r else "-"
        err = max(r["rel_err"].values())
        print(f"{r['cell']:32s} {us} {programs:>25s} {tiles:>18s} {r['update_us']:9.0f} {err:8.1e}"
              + ("" if r["ok"] else "  FAIL"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU, Triton interpreter")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--steps", action="store_true", help="also time the engine's step mixes (cell 7)")
    ap.add_argument("--steps-only", action="store_true", help="only cell 7")
    ap.add_argument("--split-k", type=int, default=None, help="cell 7: override the split-K heuristic")
    ap.add_argument("--kernels", type=Path, default=None, help="the Triton module to load instead of src/'s")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

    import torch
    import triton
    from triton.testing import do_bench

    kref, ktri = import_kernels(args.kernels)
    if args.steps_only:
        if not args.dry_run and not torch.cuda.is_available():
            print("no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
            return 2
        rows = engine_steps(torch, kref, ktri, do_bench, args.dry_run, args.split_k)
        env = {"device": torch.cuda.get_device_name() if not args.dry_run else "cpu (interpreter)",
               "torch": torch.__version__, "triton": triton.__version__, "kernels": str(args.kernels or "src")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "steps": rows}, indent=1))
        print(env)
        print_steps(rows)
        return 0 if all(r["ok"] for r in rows) else 1
    lora_reference, lora_grouped = kref.lora_reference, kref.lora_grouped
    lora_grouped_triton, LoRAMeta = ktri.lora_grouped_triton, ktri.LoRAMeta

    if args.dry_run:
        device, fan_in, shapes = "cpu", 96, {"q_proj": 80, "v_proj": 24}
        tokens_list, active_list, slots_list, layers, rank = (8, 16), (1, 4, 8), (8, 64), 2, 16
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
            return 2
        device, fan_in, shapes = "cuda", 4096, {"q_proj": 4096, "v_proj": 1024}
        tokens_list, active_list, slots_list, layers, rank = (32, 256), (1, 8, 32), (32, 1024), 32, 16
    dtype, elt = torch.bfloat16, 2
    scale = 2.0  # alpha 32 / r 16
    gen = torch.Generator(device=device).manual_seed(0)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def bench(fn, warmup: int = 25, rep: int = 100) -> float:
        """Median milliseconds per call."""
        if args.dry_run:
            fn()
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def weights(num_slots: int, fan_out: int, active_slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.full((num_slots, rank, fan_in), float("nan"), dtype=dtype, device=device)
        b = torch.full((num_slots, fan_out, rank), float("nan"), dtype=dtype, device=device)
        idx = torch.tensor(active_slots, device=device)
        n = len(active_slots)
        a[idx] = (torch.randn(n, rank, fan_in, generator=gen, device=device) * fan_in**-0.5).to(dtype)
        b[idx] = (torch.randn(n, fan_out, rank, generator=gen, device=device) * rank**-0.5).to(dtype)
        return a, b

    def layout(tokens: int, active: int, num_slots: int) -> tuple[list[int], list[tuple[int, int, int]], list[int]]:
        """Active slots spread over the store; each owns tokens/active consecutive decode tokens as one
        segment, sorted by slot (the `lora_grouped` contract: each active slot once)."""
        stride = num_slots // active
        active_slots = [i * stride + stride // 2 for i in range(active)]
        per = tokens // active
        segments = [(i * per, (i + 1) * per, slot) for i, slot in enumerate(active_slots)]
        slot_list = [slot for start, end, slot in segments for _ in range(start, end)]
        return active_slots, segments, slot_list

    def naive(x, y, a, b, slot_t, scale_t):
        """The gather-per-token bmm: one weight copy per token."""
        u = torch.bmm(a[slot_t], x.unsqueeze(-1)) * scale_t[:, None, None]  # [T, r, 1]
        y += torch.bmm(b[slot_t], u.to(x.dtype)).squeeze(-1)
        return y

    # the copy ceiling, measured
    copy_gbs = None
    if not args.dry_run:
        src = torch.empty(1 << 29, dtype=torch.float16, device=device).normal_()  # 1 GiB
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src))
        copy_gbs = 2 * src.numel() * 2 / (t * 1e-3) / 1e9
        del src, dst

    t0 = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)

    progress(f"copy ceiling {copy_gbs and round(copy_gbs)} GB/s; checking and timing the cells")
    rows, failures = [], []
    methods = ("triton", "torch_grouped", "naive_bmm")
    for num_slots in slots_list:
        for tokens in tokens_list:
            for active in active_list:
                active_slots, segments, slot_list = layout(tokens, active, num_slots)
                ranks = [rank] * num_slots
                scales = [scale] * num_slots
                meta = LoRAMeta.build(segments, {m: ranks for m in shapes}, {m: scales for m in shapes}, device)
                slot_t = torch.tensor(slot_list, device=device)
                scale_t = torch.full((tokens,), scale, dtype=dtype, device=device)
                for module, fan_out in shapes.items():
                    a, b = weights(num_slots, fan_out, active_slots)
                    x = torch.randn(tokens, fan_in, generator=gen, device=device).to(dtype)
                    y0 = torch.randn(tokens, fan_out, generator=gen, device=device).to(dtype)
                    # float64 reference on the active slots only (remapped), so S never matters here
                    remap = {s: i for i, s in enumerate(active_slots)}
                    ref = lora_reference(x.double(), y0.double().clone(), a[active_slots].double(),
                                         b[active_slots].double(), [rank] * active, [scale] * active,
                                         [remap[s] for s in slot_list])
                    calls = {
                        "triton": partial(lora_grouped_triton, x, a=a, b=b, ranks=None, scales=None, segments=None,
                                          meta=meta[module]),
                        "torch_grouped": partial(lora_grouped, x, a=a, b=b, ranks=ranks, scales=scales,
                                                 segments=segments),
                        "naive_bmm": partial(naive, x, a=a, b=b, slot_t=slot_t, scale_t=scale_t),
                    }
                    moved = active * rank * (fan_in + fan_out) * elt + tokens * fan_in * elt + 2 * tokens * fan_out * elt
                    for method in methods:
                        y = y0.clone()
                        calls[method](y=y)
                        sync()
                        got = y.double()
                        err = ((got - ref).norm() / ref.norm()).item()
                        nan = bool(torch.isnan(got).any())
                        ok = err < 1e-2 and not nan
                        if not ok:
                            failures.append(f"{method} {module} T={tokens} active={active} S={num_slots}: "
                                            f"rel err {err:.2e}, NaN {nan}")
                        ybuf = y0.clone()
                        ms = bench(partial(calls[method], y=ybuf))
                        rows.append({"module": module, "tokens": tokens, "active": active, "slots": num_slots,
                                     "method": method, "ms": ms, "bytes": moved, "gb_s": moved / (ms * 1e-3) / 1e9,
                                     "rel_err": err, "nan": nan, "ok": ok})
                    del a, b

    progress(f"{len(rows)} rows, {len(failures)} failures; CUDA-graph steps")
    # per-step estimate: 32 layers x (q + v)
    steps = []
    for num_slots in slots_list:
        for tokens in tokens_list:
            for active in active_list:
                for method in methods:
                    t = {r["module"]: r["ms"] for r in rows if (r["slots"], r["tokens"], r["active"], r["method"])
                         == (num_slots, tokens, active, method)}
                    steps.append({"slots": num_slots, "tokens": tokens, "active": active, "method": method,
                                  "step_ms_estimate": 32 * sum(t.values())})

    # CUDA-graph step: 32 layers x (q, v), distinct weights per layer, S = 32
    graph_steps = []
    if not args.dry_run and not args.no_graph:
        num_slots = min(slots_list)
        for tokens in tokens_list:
            for active in active_list:
                active_slots, segments, slot_list = layout(tokens, active, num_slots)
                ranks, scales = [rank] * num_slots, [scale] * num_slots
                meta = LoRAMeta.build(segments, {m: ranks for m in shapes}, {m: scales for m in shapes}, device)
                slot_t = torch.tensor(slot_list, device=device)
                scale_t = torch.full((tokens,), scale, dtype=dtype, device=device)
                x = torch.randn(tokens, fan_in, generator=gen, device=device).to(dtype)
                ys = {m: torch.randn(tokens, n, generator=gen, device=device).to(dtype) for m, n in shapes.items()}
                ws = [{m: weights(num_slots, n, active_slots) for m, n in shapes.items()} for _ in range(layers)]
                for method in ("triton", "naive_bmm"):
                    def step(method=method, ws=ws, x=x, ys=ys, meta=meta, slot_t=slot_t, scale_t=scale_t) -> None:
                        for w in ws:
                            for m, (a, b) in w.items():
                                if method == "triton":
                                    lora_grouped_triton(x, ys[m], a, b, None, None, None, meta=meta[m])
                                else:
                                    naive(x, ys[m], a, b, slot_t, scale_t)
                    step()  # compile / warm up outside the capture
                    sync()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()
                    ms = bench(graph.replay, warmup=10, rep=200)
                    graph_steps.append({"tokens": tokens, "active": active, "slots": num_slots, "method": method,
                                        "step_ms_graph": ms})
                    del graph
                del ws

    progress("eager calls and LoRAMeta.build")
    # eager back-to-back calls (no sync between): wall time per call, host launch cost included.
    # If it exceeds the cold-L2 median, eager mode is host-bound and wants CUDA graphs.
    eager = []
    reps = 3 if args.dry_run else 500
    num_slots, tokens, active = min(slots_list), min(tokens_list), max(active_list)
    active_slots, segments, slot_list = layout(tokens, active, num_slots)
    ranks, scales = [rank] * num_slots, [scale] * num_slots
    meta = LoRAMeta.build(segments, {m: ranks for m in shapes}, {m: scales for m in shapes}, device)
    slot_t = torch.tensor(slot_list, device=device)
    scale_t = torch.full((tokens,), scale, dtype=dtype, device=device)
    a, b = weights(num_slots, shapes["q_proj"], active_slots)
    x = torch.randn(tokens, fan_in, generator=gen, device=device).to(dtype)
    y = torch.randn(tokens, shapes["q_proj"], generator=gen, device=device).to(dtype)
    calls = {
        "triton": partial(lora_grouped_triton, x, y, a, b, None, None, None, meta=meta["q_proj"]),
        "torch_grouped": partial(lora_grouped, x, y, a, b, ranks, scales, segments),
        "naive_bmm": partial(naive, x, y, a, b, slot_t, scale_t),
    }
    for method, call in calls.items():
        for _ in range(min(20, reps)):
            call()
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        sync()
        eager.append({"module": "q_proj", "tokens": tokens, "active": active, "slots": num_slots,
                      "method": method, "eager_us_per_call": 1e6 * (time.perf_counter() - start) / reps})
    del a, b

    # host cost of building the per-step metadata (32 segments, 2 modules)
    segs = [(i, i + 1, i) for i in range(32)]
    lists = {m: [rank] * 32 for m in shapes}
    LoRAMeta.build(segs, lists, {m: [scale] * 32 for m in shapes}, device)
    sync()
    start = time.perf_counter()
    for _ in range(100):
        LoRAMeta.build(segs, lists, {m: [scale] * 32 for m in shapes}, device)
    sync()
    meta_build_us = 1e6 * (time.perf_counter() - start) / 100

    progress("split_k / block_n sweep")
    # split_k / block_n sweep of the Triton op, S = min
    sweep = []
    if not args.no_sweep:
        num_slots = min(slots_list)
        for module, fan_out in shapes.items():
            for tokens in tokens_list:
                for active in active_list:
                    active_slots, segments, slot_list = layout(tokens, active, num_slots)
                    meta = LoRAMeta.build(segments, {module: [rank] * num_slots}, {module: [scale] * num_slots}, device)
                    a, b = weights(num_slots, fan_out, active_slots)
                    x = torch.randn(tokens, fan_in, generator=gen, device=device).to(dtype)
                    y = torch.randn(tokens, fan_out, generator=gen, device=device).to(dtype)
                    for split_k in (None, 4, 8, 16, 32):
                        for block_n in (None, 64, 256):
                            def call(split_k=split_k, block_n=block_n, a=a, b=b, x=x, y=y, meta=meta, module=module):
                                return lora_grouped_triton(x, y, a, b, None, None, None, meta=meta[module],
                                                           split_k=split_k, block_n=block_n)
                            ms = bench(call, warmup=5, rep=30)
                            sweep.append({"module": module, "tokens": tokens, "active": active, "split_k": split_k,
                                          "block_n": block_n, "ms": ms})

    step_rows = []
    if args.steps:
        progress("engine steps (captured q + v launch pairs)")
        step_rows = engine_steps(torch, kref, ktri, do_bench, args.dry_run, args.split_k)
        failures += [f"step {r['cell']}: rel err {r['rel_err']}" for r in step_rows if not r["ok"]]

    progress("done")
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "copy_gb_s": copy_gbs, "dry_run": args.dry_run}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "step_estimates": steps, "graph_steps": graph_steps,
                                    "meta_build_us": meta_build_us, "eager": eager, "sweep": sweep, "steps": step_rows,
                                    "failures": failures}, indent=1))

    # the table, last
    if sweep:
        print("\nsweep (S = min): best split_k / block_n per cell, against the heuristic (None / None)")
        for module in shapes:
            for tokens in tokens_list:
                for active in active_list:
                    cell = [s for s in sweep if (s["module"], s["tokens"], s["active"]) == (module, tokens, active)]
                    best = min(cell, key=lambda s: s["ms"])
                    heur = next(s for s in cell if s["split_k"] is None and s["block_n"] is None)
                    print(f"  {module:7s} T={tokens:3d} active={active:2d}: heuristic {1e3 * heur['ms']:7.1f} us, "
                          f"best {1e3 * best['ms']:7.1f} us at split_k={best['split_k']} block_n={best['block_n']}")
    print(f"\n{env}\ncopy ceiling: {copy_gbs and round(copy_gbs)} GB/s; LoRAMeta.build (32 segments, 2 modules): "
          f"{meta_build_us:.0f} us on the host")
    for e in eager:
        print(f"eager, back to back ({e['module']} T={e['tokens']} active={e['active']} S={e['slots']}): "
              f"{e['method']:14s} {e['eager_us_per_call']:7.1f} us/call")
    print(f"\n{'module':7s} {'T':>4s} {'act':>4s} {'S':>5s} {'method':14s} {'us/call':>9s} {'MB':>7s} {'eff GB/s':>8s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['module']:7s} {r['tokens']:4d} {r['active']:4d} {r['slots']:5d} {r['method']:14s} "
              f"{1e3 * r['ms']:9.1f} {r['bytes'] / 1e6:7.2f} {r['gb_s']:8.0f} {r['rel_err']:9.1e}{'' if r['ok'] else '  FAIL'}")
    print("\nper step, q + v over 32 layers (ms): estimate 32 x (t_q + t_v) from the cold-L2 medians"
          + ("; graph: one captured step replayed (S = 32)" if graph_steps else ""))
    print(f"{'T':>4s} {'act':>4s} {'S':>5s} " + " ".join(f"{m:>14s}" for m in methods)
          + ("   graph triton   graph naive" if graph_steps else ""))
    for num_slots in slots_list:
        for tokens in tokens_list:
            for active in active_list:
                est = {s["method"]: s["step_ms_estimate"] for s in steps
                       if (s["slots"], s["tokens"], s["active"]) == (num_slots, tokens, active)}
                line = f"{tokens:4d} {active:4d} {num_slots:5d} " + " ".join(f"{est[m]:14.3f}" for m in methods)
                g = {s["method"]: s["step_ms_graph"] for s in graph_steps
                     if (s["slots"], s["tokens"], s["active"]) == (num_slots, tokens, active)}
                if g:
                    line += f" {g['triton']:14.3f} {g['naive_bmm']:13.3f}"
                print(line)
    if step_rows:
        print_steps(step_rows)
    if failures:
        print("\nCORRECTNESS FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} checks passed; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
