"""The Triton LoRA kernels (kernels/lora_triton.py) compute what `lora_reference` says.

The kernel tests (`test_kernel_*`) run on a CUDA device when there is one. Without one they run on
the CPU under Triton's interpreter: `test_kernels_under_triton_interpreter` starts this file again in
a subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported), selecting them.
The metadata tests (the tile map, the grid bound, the launch plans of the engine's step buckets) need
neither triton nor a GPU.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _kernel_marks import kernel_test
from lorascope.kernels.lora import lora_grouped, lora_reference, segments_to_token_slots
from lorascope.kernels.lora_triton import (
    BLOCK_M,
    HAS_TRITON,
    LoRAMeta,
    grid_tiles,
    launch_plan,
    lora_grouped_triton,
    lora_multi_expand,
    lora_multi_shrink,
    lora_multi_triton,
    padded_rank,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"

cuda_only = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA device and triton")

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_case(gen: torch.Generator, dtype: torch.dtype, num_slots: int, active: int, fan_in: int, fan_out: int,
              r_max: int = 16, lengths: tuple[int, ...] = (1, 3, 17), gap: int = 2, rank_cycle=(4, 8, 16)):
    """Weights with NaN in every stale row (past a slot's rank), segments of the given lengths in
    sorted slot order with `gap` base-model tokens before each, one active slot of rank 0."""
    ranks = [min(r_max, rank_cycle[i % len(rank_cycle)]) for i in range(num_slots)]
    scales = [0.25 + 0.5 * (i % 5) for i in range(num_slots)]
    chosen = sorted(torch.randperm(num_slots, generator=gen)[:active].tolist())
    if active >= 3:
        ranks[chosen[1]] = 0  # an active slot whose adapter lacks this module
    a = torch.randn(num_slots, r_max, fan_in, generator=gen, dtype=torch.float64)
    b = torch.randn(num_slots, fan_out, r_max, generator=gen, dtype=torch.float64)
    for s, r in enumerate(ranks):  # stale weights: must never be read (NaN would poison any sum)
        a[s, r:] = float("nan")
        b[s, :, r:] = float("nan")
    segments, pos = [], 0
    for i, slot in enumerate(chosen):
        pos += gap
        n = lengths[i % len(lengths)]
        segments.append((pos, pos + n, slot))
        pos += n
    tokens = pos + gap
    x = torch.randn(tokens, fan_in, generator=gen, dtype=torch.float64)
    y0 = torch.randn(tokens, fan_out, generator=gen, dtype=torch.float64)
    on = {"dtype": dtype, "device": DEVICE}
    return x.to(**on), y0.to(**on), a.to(**on), b.to(**on), ranks, scales, segments


def check(x, y0, a, b, ranks, scales, segments, got, dtype) -> None:
    tokens = x.shape[0]
    slots_of = segments_to_token_slots(segments, tokens)
    ref = lora_reference(x.double().cpu(), y0.double().cpu(), a.double().cpu(), b.double().cpu(), ranks, scales,
                         slots_of)
    got = got.double().cpu()
    assert not torch.isnan(got).any(), "stale (NaN) rows leaked into the result"
    delta = (ref - y0.double().cpu()).norm()
    if delta > 0:
        err = ((got - ref).norm() / delta).item()
        assert err < TOL[dtype], f"relative error {err:.2e} over the LoRA delta (tolerance {TOL[dtype]:.0e})"
    untouched = [t for t, s in enumerate(slots_of) if s < 0 or ranks[s] == 0]
    assert torch.equal(got[untouched], y0.double().cpu()[untouched]), "tokens without an adapter must be untouched"


def check_grouped(x, y0, a, b, ranks, scales, segments, got, dtype) -> None:
    """`got` against torch's `lora_grouped` in float64 (stale NaN rows zeroed: they must add nothing)."""
    ref = lora_grouped(x.double().cpu(), y0.double().cpu().clone(), a.double().cpu().nan_to_num(),
                       b.double().cpu().nan_to_num(), ranks, scales, segments)
    got = got.double().cpu()
    assert not torch.isnan(got).any(), "stale (NaN) rows leaked into the result"
    delta = (ref - y0.double().cpu()).norm()
    if delta > 0:
        err = ((got - ref).norm() / delta).item()
        assert err < TOL[dtype], f"relative error {err:.2e} over the LoRA delta (tolerance {TOL[dtype]:.0e})"
    slots_of = segments_to_token_slots(segments, x.shape[0])
    untouched = [t for t, s in enumerate(slots_of) if s < 0 or ranks[s] == 0]
    assert torch.equal(got[untouched], y0.double().cpu()[untouched]), "tokens without an adapter must be untouched"


def stale_nan_weights(gen: torch.Generator, dtype: torch.dtype, ranks: list[int], r_max: int, fan_in: int,
                      fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(len(ranks), r_max, fan_in, generator=gen, dtype=torch.float64)
    b = torch.randn(len(ranks), fan_out, r_max, generator=gen, dtype=torch.float64)
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")
        b[s, :, r:] = float("nan")
    return a.to(dtype=dtype, device=DEVICE), b.to(dtype=dtype, device=DEVICE)


def packed_segments(lengths: list[int], slots: list[int], gaps: list[int]) -> list[tuple[int, int, int]]:
    """Segments of the given lengths and slots, each after its gap of base-model tokens."""
    segments, pos = [], 0
    for n, slot, gap in zip(lengths, slots, gaps, strict=True):
        pos += gap
        segments.append((pos, pos + n, slot))
        pos += n
    return segments


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_slots,active", [(1, 1), (8, 3), (8, 8), (64, 5)])
@pytest.mark.parametrize("fan_in,fan_out", [(72, 40), (200, 136)])
def test_kernel_matches_reference(dtype: torch.dtype, num_slots: int, active: int, fan_in: int, fan_out: int) -> None:
    gen = torch.Generator().manual_seed(num_slots * 31 + active * 7 + fan_in)
    x, y0, a, b, ranks, scales, segments = make_case(gen, dtype, num_slots, active, fan_in, fan_out)
    y = y0.clone()
    out = lora_grouped_triton(x, y, a, b, ranks, scales, segments)
    assert out is y, "y is updated in place and returned"
    check(x, y0, a, b, ranks, scales, segments, y, dtype)


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in,fan_outs,lengths,gap", [(96, (40, 24, 24), (1, 3, 17), 2), (96, (136, 72), (1,), 0),
                                                         (96, (50,), (2, 1), 1), (1100, (70, 40), (1, 5), 1)])
def test_kernel_multi_module_matches_reference(dtype: torch.dtype, fan_in: int, fan_outs: tuple[int, ...],
                                               lengths: tuple[int, ...], gap: int) -> None:
    """q/k/v (or gate/up) in two launches: each module's y gets exactly its own delta, with its own
    ranks (a module an adapter lacks: rank 0) and scales, over one step's segments (fan_in 1100: K
    split across programs, a partial last tile)."""
    cases = []
    for i, fan_out in enumerate(fan_outs):
        g = torch.Generator().manual_seed(1000 * i + fan_out)
        cases.append(make_case(g, dtype, 12, 6, fan_in, fan_out, lengths=lengths, gap=gap, rank_cycle=(*(16, 8, 4)[i:], 0, 16)))
    segments = cases[0][6]
    x = cases[0][0]
    ranks = {f"m{i}": c[4] for i, c in enumerate(cases)}
    scales = {f"m{i}": c[5] for i, c in enumerate(cases)}
    meta = LoRAMeta.build(segments, ranks, scales, x.device)
    ys = [c[1].clone() for c in cases]
    lora_multi_triton(x, [(y, c[2], c[3], meta[f"m{i}"]) for i, (y, c) in enumerate(zip(ys, cases))])
    for y, c in zip(ys, cases):
        _, y0, a, b, rk, sc, _ = c
        check(x, y0, a, b, rk, sc, segments, y, dtype)


@pytest.mark.gpu
@kernel_test
def test_kernel_shrink_and_expand_halves_equal_the_pair() -> None:
    """`lora_multi_shrink` then `lora_multi_expand` (what a step does when the shrink runs on a second
    stream beside the base GEMM; on CUDA here it does) give exactly `lora_multi_triton`'s result, and
    the shrink refuses an x that does not fit A."""
    fan_in, fan_outs = 96, (40, 24)
    cases = [make_case(torch.Generator().manual_seed(7 + i), torch.bfloat16, 8, 5, fan_in, n, lengths=(1, 1, 4, 1),
                       rank_cycle=(16, 8, 0)) for i, n in enumerate(fan_outs)]
    segments, x = cases[0][6], cases[0][0]
    meta = LoRAMeta.build(segments, {f"m{i}": c[4] for i, c in enumerate(cases)},
                          {f"m{i}": c[5] for i, c in enumerate(cases)}, x.device)
    pair = [c[1].clone() for c in cases]
    lora_multi_triton(x, [(y, c[2], c[3], meta[f"m{i}"]) for i, (y, c) in enumerate(zip(pair, cases))])
    halves = [c[1].clone() for c in cases]
    stream = torch.cuda.Stream() if HAS_CUDA else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    shrunk = lora_multi_shrink(x, [(c[2], meta[f"m{i}"]) for i, c in enumerate(cases)], list(fan_outs), stream=stream)
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    lora_multi_expand(shrunk, [(y, c[2], c[3], meta[f"m{i}"]) for i, (y, c) in enumerate(zip(halves, cases))])
    for got, want in zip(halves, pair):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="does not match A"):
        lora_multi_shrink(x[:, :-8], [(cases[0][2], meta["m0"])], [fan_outs[0]])


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("r_max,rank_cycle", [(8, (4, 8)), (24, (24, 4, 17)), (64, (64, 16))])
def test_kernel_ranks_not_power_of_two_padding(r_max: int, rank_cycle: tuple[int, ...]) -> None:
    """r_max is padded to a power of two >= 16 inside the kernels; ranks up to r_max all work."""
    gen = torch.Generator().manual_seed(r_max)
    case = make_case(gen, torch.float32, 6, 4, 96, 50, r_max=r_max, rank_cycle=rank_cycle, lengths=(2, 1, 5))
    x, y0, a, b, ranks, scales, segments = case
    y = y0.clone()
    lora_grouped_triton(x, y, a, b, ranks, scales, segments)
    check(*case, y, torch.float32)
    assert padded_rank(r_max) >= max(16, r_max)


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("split_k", [1, 2, 3, 16])
def test_kernel_split_k_and_block_n_overrides(split_k: int) -> None:
    """Every split of K (including more splits than K blocks) gives the same sum."""
    gen = torch.Generator().manual_seed(split_k)
    case = make_case(gen, torch.float32, 8, 4, 300, 70, lengths=(1, 17, 3))
    x, y0, a, b, ranks, scales, segments = case
    y = y0.clone()
    lora_grouped_triton(x, y, a, b, ranks, scales, segments, split_k=split_k, block_n=32)
    check(*case, y, torch.float32)


@pytest.mark.gpu
@kernel_test
def test_kernel_decode_single_token_segments_no_gaps() -> None:
    """Uniform decode: every token its own segment, back to back, many slots."""
    gen = torch.Generator().manual_seed(5)
    case = make_case(gen, torch.bfloat16, 64, 24, 136, 72, lengths=(1,), gap=0)
    x, y0, a, b, ranks, scales, segments = case
    y = y0.clone()
    lora_grouped_triton(x, y, a, b, ranks, scales, segments)
    check(*case, y, torch.bfloat16)


@pytest.mark.gpu
@kernel_test
def test_kernel_empty_and_all_base_batches_leave_y_alone() -> None:
    gen = torch.Generator().manual_seed(9)
    x, y0, a, b, ranks, scales, _ = make_case(gen, torch.float32, 4, 2, 40, 24)
    y = y0.clone()
    assert lora_grouped_triton(x, y, a, b, ranks, scales, []) is y
    assert torch.equal(y, y0)
    zero_rank = [0] * len(ranks)
    lora_grouped_triton(x, y, a, b, zero_rank, scales, [(0, 3, 1), (3, 3, 2)])  # rank 0; an empty segment
    assert torch.equal(y, y0)
    meta = LoRAMeta.build([], {"q_proj": ranks}, {"q_proj": scales}, DEVICE)
    lora_grouped_triton(x, y, a, b, None, None, None, meta=meta["q_proj"])
    assert torch.equal(y, y0)


@pytest.mark.gpu
@kernel_test
def test_kernel_meta_built_once_serves_modules_and_layers() -> None:
    """One LoRAMeta per step: each module's view carries its own ranks and scales, every layer reuses it;
    a fixed-capacity meta (padding segments) and its in-place update give the same results."""
    gen = torch.Generator().manual_seed(11)
    num_slots, fan_in = 16, 80
    segments = [(1, 2, 3), (2, 5, 6), (7, 24, 9), (24, 25, 15)]
    ranks = {"q_proj": [(16, 8, 4)[s % 3] for s in range(num_slots)], "v_proj": [(4, 0, 16, 8)[s % 4] for s in range(num_slots)]}
    scales = {"q_proj": [0.5 + s for s in range(num_slots)], "v_proj": [2.0 - 0.1 * s for s in range(num_slots)]}
    fan_out = {"q_proj": 48, "v_proj": 20}
    metas = [LoRAMeta.build(segments, ranks, scales, DEVICE),
             LoRAMeta.build([(0, 1, 0)], ranks, scales, DEVICE, capacity=8, max_len_bound=32)]
    metas[1].update(segments, ranks, scales)
    for meta in metas:
        for _layer in range(2):
            x = torch.randn(26, fan_in, generator=gen).to(DEVICE)
            for module in ("q_proj", "v_proj"):
                a = torch.randn(num_slots, 16, fan_in, generator=gen).to(DEVICE)
                b = torch.randn(num_slots, fan_out[module], 16, generator=gen).to(DEVICE)
                y0 = torch.randn(26, fan_out[module], generator=gen).to(DEVICE)
                y = y0.clone()
                lora_grouped_triton(x, y, a, b, None, None, None, meta=meta[module])
                check(x, y0, a, b, ranks[module], scales[module], segments, y, torch.float32)


@pytest.mark.gpu
@kernel_test
def test_kernel_strided_inputs() -> None:
    """x and y may be column slices of wider tensors (e.g. a fused projection's output)."""
    gen = torch.Generator().manual_seed(13)
    x, y0, a, b, ranks, scales, segments = make_case(gen, torch.float32, 8, 4, 72, 40)
    wide_x = torch.randn(x.shape[0], 100, generator=gen).to(DEVICE)
    wide_x[:, 10:82] = x
    wide_y = torch.randn(x.shape[0], 64, generator=gen).to(DEVICE)
    wide_y[:, 5:45] = y0
    keep = wide_y.clone()
    lora_grouped_triton(wide_x[:, 10:82], wide_y[:, 5:45], a, b, ranks, scales, segments)
    check(x, y0, a, b, ranks, scales, segments, wide_y[:, 5:45], torch.float32)
    assert torch.equal(wide_y[:, :5], keep[:, :5]) and torch.equal(wide_y[:, 45:], keep[:, 45:])


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("dtype,lengths,block_m", [
    (torch.float32, (1, 2, 7, 64, 130, 300, 1, 16, 17), 16),
    (torch.bfloat16, (1, 2, 7, 64, 130, 300, 1, 16, 17), 16),
    (torch.float32, (64, 130, 300, 70), 64),  # prefill only: 64-row tiles
    (torch.bfloat16, (20, 33, 130), 32),
])
def test_kernel_mixed_lengths_heterogeneous_ranks_three_modules(dtype: torch.dtype, lengths: tuple[int, ...],
                                                                block_m: int) -> None:
    """Decode tokens, short and long prefill chunks (1 to 19 tiles, partial last tiles) in one step, three
    modules of their own ranks (0 where an adapter lacks the module) and scales, against `lora_grouped`;
    a meta built for one step sizes its tiles by the shortest segment."""
    gen = torch.Generator().manual_seed(23 + len(lengths))
    slots = [0, 2, 3, 5, 6, 8, 9, 10, 11][: len(lengths)]
    segments = packed_segments(list(lengths), slots, [0, 0, 3, 0, 1, 0, 2, 0, 0][: len(lengths)])
    tokens, fan_in, r_max = segments[-1][1] + 2, 96, 24
    x = torch.randn(tokens, fan_in, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    ranks = {m: [(24, 4, 17, 0, 8, 16)[(s + i) % 6] for s in range(12)] for i, m in enumerate(("q", "k", "v"))}
    scales = {m: [0.5 + 0.25 * ((s + i) % 4) for s in range(12)] for i, m in enumerate(("q", "k", "v"))}
    fan_outs = {"q": 40, "k": 24, "v": 24}
    weights = {m: stale_nan_weights(gen, dtype, ranks[m], r_max, fan_in, n) for m, n in fan_outs.items()}
    y0 = {m: torch.randn(tokens, n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
          for m, n in fan_outs.items()}
    meta = LoRAMeta.build(segments, ranks, scales, DEVICE)
    assert meta.block_m == block_m and int(meta.tiles[0]) == sum(-(-n // block_m) for n in lengths)
    ys = {m: y.clone() for m, y in y0.items()}
    lora_multi_triton(x, [(ys[m], *weights[m], meta[m]) for m in fan_outs])
    for m in fan_outs:
        check_grouped(x, y0[m], *weights[m], ranks[m], scales[m], segments, ys[m], dtype)


@pytest.mark.gpu
@kernel_test
def test_kernel_capacity_meta_updated_across_step_shapes() -> None:
    """One capacity-built meta (as the engine captures a bucket), updated in place for steps of every
    shape: the grid stays the same, each step gets exactly its own result, and a step with fewer tiles
    than the one before never runs the stale tile entries past its count."""
    gen = torch.Generator().manual_seed(29)
    capacity, bucket, fan_in, num_slots = 12, 320, 72, 16
    ranks = {"q_proj": [(16, 8, 4, 0)[s % 4] for s in range(num_slots)], "v_proj": [(4, 16, 0, 12)[s % 4] for s in range(num_slots)]}
    scales = {"q_proj": [0.5 + s for s in range(num_slots)], "v_proj": [2.0 - 0.1 * s for s in range(num_slots)]}
    fan_outs = {"q_proj": 40, "v_proj": 24}
    weights = {m: stale_nan_weights(gen, torch.float32, ranks[m], 16, fan_in, n) for m, n in fan_outs.items()}
    x = torch.randn(bucket, fan_in, generator=gen).to(DEVICE)
    meta = LoRAMeta.build([], ranks, scales, DEVICE, capacity=capacity, max_len_bound=bucket)
    plan = launch_plan(bucket, fan_in, list(fan_outs.values()), meta["q_proj"])
    steps = {
        "mixed": packed_segments([1, 2, 7, 64, 130, 1, 1], [1, 2, 5, 6, 7, 9, 13], [0, 0, 1, 0, 3, 0, 0]),
        "no segments": [],
        "one long prefill": [(4, 304, 5)],
        "many decode tokens": packed_segments([1] * capacity, list(range(capacity)), [0, 2] * (capacity // 2)),
        "prefill and decode": packed_segments([300, 1, 2, 1], [1, 3, 6, 10], [0, 0, 0, 1]),
    }
    for name, segments in steps.items():
        meta.update(segments, ranks, scales)
        assert launch_plan(bucket, fan_in, list(fan_outs.values()), meta["q_proj"]) == plan, name
        y0 = {m: torch.randn(bucket, n, generator=gen).to(DEVICE) for m, n in fan_outs.items()}
        ys = {m: y.clone() for m, y in y0.items()}
        lora_multi_triton(x, [(ys[m], *weights[m], meta[m]) for m in fan_outs])
        for m in fan_outs:
            check_grouped(x, y0[m], *weights[m], ranks[m], scales[m], segments, ys[m], torch.float32)


@pytest.mark.gpu
@cuda_only
def test_gpu_llama_shape_decode_and_prefill() -> None:
    """The Llama-3.1-8B q/v shapes in bf16: decode (32 single-token segments) and a prefill mix."""
    gen = torch.Generator().manual_seed(17)
    for fan_out in (4096, 1024):
        for lengths, active in (((1,), 32), ((1, 200, 7), 6)):
            case = make_case(gen, torch.bfloat16, 64, active, 4096, fan_out, lengths=lengths, gap=0,
                             rank_cycle=(16, 8))
            x, y0, a, b, ranks, scales, segments = case
            y = y0.clone()
            lora_grouped_triton(x, y, a, b, ranks, scales, segments)
            check(*case, y, torch.bfloat16)
            again = y0.clone()
            lora_grouped_triton(x, again, a, b, ranks, scales, segments)
            assert torch.equal(y, again), "split-K is reduced in a fixed order: runs are bit-identical"


@pytest.mark.gpu
@cuda_only
def test_gpu_cuda_graph_replay_with_updated_meta() -> None:
    gen = torch.Generator().manual_seed(19)
    num_slots, fan_in, fan_out, tokens = 32, 256, 192, 40
    a = torch.randn(num_slots, 16, fan_in, generator=gen).to("cuda", torch.bfloat16)
    b = torch.randn(num_slots, fan_out, 16, generator=gen).to("cuda", torch.bfloat16)
    ranks = {"q_proj": [(16, 8, 4)[s % 3] for s in range(num_slots)]}
    scales = {"q_proj": [0.5] * num_slots}
    x = torch.randn(tokens, fan_in, generator=gen).to("cuda", torch.bfloat16)
    y = torch.empty(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
    y0 = torch.randn(tokens, fan_out, generator=gen).to("cuda", torch.bfloat16)
    meta = LoRAMeta.build([(0, 1, 0)], ranks, scales, "cuda", capacity=32, max_len_bound=tokens)
    y.copy_(y0)
    lora_grouped_triton(x, y, a, b, None, None, None, meta=meta["q_proj"])  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_grouped_triton(x, y, a, b, None, None, None, meta=meta["q_proj"])
    for segments in ([(0, 1, 3), (1, 2, 7), (5, 30, 8)], [(i, i + 1, i % num_slots) for i in range(tokens - 8)], [],
                     [(0, tokens, 5)], [(0, 1, 3), (1, 2, 4), (2, tokens, 9)]):
        meta.update(segments, ranks, scales)
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        check(x, y0, a, b, ranks["q_proj"], scales["q_proj"], segments, y, torch.bfloat16)


def test_meta_rejects_overflow_and_packs_per_module_rows() -> None:
    ranks = {"q_proj": [4, 8, 16], "v_proj": [0, 16, 8]}
    scales = {"q_proj": [1.0, 2.0, 3.0], "v_proj": [0.0, 5.0, 6.0]}
    meta = LoRAMeta.build([(0, 2, 2), (2, 3, 1)], ranks, scales, "cpu", capacity=4, max_len_bound=8)
    assert meta.ints.tolist() == [[0, 2, 0, 0], [2, 1, 0, 0], [2, 1, 0, 0], [16, 8, 0, 0], [8, 16, 0, 0]]
    assert meta["v_proj"].scale.tolist() == [6.0, 5.0, 0.0, 0.0]
    assert meta["q_proj"].num_segments == 4 and meta["q_proj"].max_len == 8
    with pytest.raises(ValueError, match="capacity"):
        meta.update([(i, i + 1, 0) for i in range(5)], ranks, scales)
    with pytest.raises(ValueError, match="max_len_bound"):
        meta.update([(0, 9, 0)], ranks, scales)
    with pytest.raises(ValueError, match="needs a meta built"):
        LoRAMeta.build([(0, 2, 2)], ranks, scales, "cpu").update([], ranks, scales)
    assert meta.tiles[:5].tolist() == [2, 0, 0, 1, 0], "tile count, then (segment, first row) per tile"
    meta.update([], ranks, scales)
    assert meta.tiles[0] == 0 and meta.ints[1].tolist() == [0, 0, 0, 0]


def test_meta_tile_map_cuts_segments_into_block_m_rows() -> None:
    lengths = [1, 2, 16, 17, 0, 33]
    segments = packed_segments(lengths, [0, 1, 2, 3, 4, 5], [0] * 6)
    ranks, scales = {"q_proj": [8] * 6}, {"q_proj": [1.0] * 6}
    for meta in (LoRAMeta.build(segments, ranks, scales, "cpu"),
                 LoRAMeta.build([], ranks, scales, "cpu", capacity=8, max_len_bound=40)):
        if meta.capacity:
            meta.update(segments, ranks, scales)
        count = int(meta.tiles[0])
        pairs = meta.tiles[1 : 1 + 2 * count].view(count, 2).tolist()
        assert pairs == [[0, 0], [1, 0], [2, 0], [3, 0], [3, 16], [5, 0], [5, 16], [5, 32]]
    assert BLOCK_M == 16
    prefill = LoRAMeta.build([(0, 64, 0), (64, 200, 1), (200, 200, 2)], ranks, scales, "cpu")
    assert prefill.block_m == 64 and prefill.tiles.tolist() == [4, 0, 0, 1, 0, 1, 64, 1, 128]
    graph = LoRAMeta.build([(0, 64, 0)], ranks, scales, "cpu", capacity=4, max_len_bound=64)
    assert graph.block_m == BLOCK_M, "a graph's meta may see an all-decode step: 16-row tiles"


def test_grid_holds_every_step_that_fits_the_capacity() -> None:
    """Random steps of disjoint segments within T rows and the capacity: their tiles never exceed the
    grid's token-tile axis, which never exceeds the tile map's room."""
    rng = random.Random(31)
    ranks, scales = {"q_proj": [4] * 300}, {"q_proj": [1.0] * 300}
    for bucket, capacity in ((1, 1), (7, 7), (16, 16), (160, 160), (256, 256), (300, 256), (1024, 256), (64, 8)):
        meta = LoRAMeta.build([], ranks, scales, "cpu", capacity=capacity, max_len_bound=bucket)
        bound = grid_tiles(meta["q_proj"], bucket)
        assert bound <= meta.tile_capacity
        worst = [(i, i + 1, i) for i in range(capacity - 1)] + [(capacity - 1, bucket, capacity - 1)]
        for trial in range(40):
            if trial == 0:
                segments = worst  # as many segments as fit, then one long one: the bound is tight
            else:
                cuts = sorted(rng.sample(range(1, bucket), min(bucket - 1, rng.randrange(capacity))))
                segments = [(s, e, i) for i, (s, e) in enumerate(itertools.pairwise([0, *cuts, bucket]))
                            if rng.random() < 0.8]  # some rows without an adapter
            meta.update(segments, ranks, scales)
            tiles = int(meta.tiles[0])
            assert tiles == sum(-(-(e - s) // BLOCK_M) for s, e, _ in segments)
            assert tiles <= bound, (bucket, capacity, segments)
            if trial == 0:
                assert tiles == bound


@pytest.mark.parametrize("bucket,lengths,tiles,real", [
    (32, [1] * 32, 32, 32),
    (256, [1] * 256, 256, 256),
    (160, [1] * 30 + [128], 160, 38),
    (256, [1] * 32 + [224], 256, 46),
    (1024, [256] * 4, 304, 64),
])
def test_engine_buckets_launch_grids_proportional_to_tokens(bucket: int, lengths: list[int], tiles: int,
                                                            real: int) -> None:
    """The engine's capture (capacity = min(max_num_seqs 256, bucket), max_len_bound = bucket) at the
    Llama-3.1-8B q/v shapes: the token-tile axis is capacity + the bucket's further 16-row tiles, not
    capacity x tiles of the longest segment (the T = 160 mixed step's expand had 160 x 3 x 40 = 19,200
    programs; now 160 x 40)."""
    ranks, scales = {"q_proj": [16] * 256, "v_proj": [16] * 256}, {"q_proj": [2.0] * 256, "v_proj": [2.0] * 256}
    meta = LoRAMeta.build([], ranks, scales, "cpu", capacity=min(256, bucket), max_len_bound=bucket)
    before = launch_plan(bucket, 4096, [4096, 1024], meta["q_proj"])
    meta.update(packed_segments(lengths, list(range(len(lengths))), [0] * len(lengths)), ranks, scales)
    plan = launch_plan(bucket, 4096, [4096, 1024], meta["q_proj"])
    assert plan == before, "the grid depends on shapes only"
    assert (plan.tiles, int(meta.tiles[0])) == (tiles, real)
    assert plan.expand_grid == (32 + 8, tiles) and plan.programs[1] == 40 * tiles


@pytest.mark.skipif(not HAS_TRITON, reason="import triton failed: install it (pip install --no-deps triton) to run the interpreter tests")
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_kernels_under_triton_interpreter() -> None:
    """Run every test_kernel_* above on the CPU through Triton's interpreter, in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_kernel_", str(Path(__file__))],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=900,
    )
    elapsed = time.perf_counter() - start
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"interpreter run failed after {elapsed:.0f} s:\n{tail}"
    assert " passed" in tail and "skipped" not in tail, f"the interpreter run skipped tests:\n{tail}"


@pytest.mark.skipif(not HAS_TRITON, reason="import triton failed")
def test_op_rejects_bad_inputs_before_launching() -> None:
    a, b = torch.randn(2, 4, 8), torch.randn(2, 6, 4)
    x, y = torch.randn(3, 8), torch.zeros(3, 6)
    with pytest.raises(ValueError, match="one dtype"):
        lora_grouped_triton(x.double(), y.double(), a.double(), b.double(), [4, 4], [1.0, 1.0], [(0, 3, 1)])
    with pytest.raises(ValueError, match="share one dtype"):
        lora_grouped_triton(x, y.half(), a, b, [4, 4], [1.0, 1.0], [(0, 3, 1)])
    with pytest.raises(ValueError, match="do not fit"):
        lora_grouped_triton(x, y, torch.randn(2, 4, 9), b, [4, 4], [1.0, 1.0], [(0, 3, 1)])
    with pytest.raises(ValueError, match="either meta"):
        lora_grouped_triton(x, y, a, b, None, None, [(0, 3, 1)])
