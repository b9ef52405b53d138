"""Paged attention of a whole mixed step (prefill chunks + decode tokens) on the GPU: one Triton kernel
(plus an optional split-K reduce), fixed shapes, no host sync, capturable in a CUDA graph.

    for sequence s and its i-th new token (0 <= i < q_len[s]), flat token t = q_start[s] + i:
    p = seq_lens[s] - q_len[s] + i (its position), lo(p) = max(0, p - sliding_window + 1) (0 without a window)
    out[t, h] = softmax_j(scale * q[t, h] . K[s, kvh(h), j]) @ V[s, kvh(h), j] over lo(p) <= j <= p
    K[s, g, j] = k_cache[block_tables[s, j // block_size] * block_size + j % block_size, g]

The semantics of kernels/attention.py's torch paths (`_prefill_mask`: k <= q_pos and k > q_pos - window;
the decode mask: the same with q_pos = kv_len - 1) and of attention_triton.py's decode kernel (a decode
token is the q_len = 1 case), for any mix of sequences in one launch.

Layout contract (what `varlen_metadata` packs): the new tokens of sequence s are the flat tokens
[q_start[s], q_start[s] + q_len[s]); sequences come one after another: q_start is nondecreasing and
q_start[s] + q_len[s] <= q_start[s + 1] (<= T for the last); padding sequences have q_len 0 (their q_start
the end of the previous sequence, e.g. the number of used tokens) and write nothing. Flat tokens that
belong to no sequence (padding at the end of T) are never written by the kernel: with `out` given they
keep their values, with out=None (a zero-filled buffer) they are zeros. Values are clamped on the device
(q_start to [0, T], q_len to the tokens left, seq_lens to [0, max_blocks * block_size]), so bad metadata
cannot read or write out of bounds; a token whose position is negative (q_len > seq_len) gets zeros.

Kernel (`_varlen_kernel`), grid (num_tiles, Hkv, num_splits), num_tiles = T // BLOCK_M + S: a program
owns one query tile (up to BLOCK_M consecutive new tokens of one sequence) and one kv head, with all
GROUP = H / Hkv query heads that share that head, as one [BLOCK_M * GROUP_PAD, D] tile of rows (row r =
token r // GROUP_PAD, head r % GROUP_PAD; GROUP_PAD = GROUP rounded up to a power of two, padding heads
masked). Each K/V row is thus read once per (tile, kv head) instead of once per query head: GROUP times
less K/V traffic than looping over heads, and a bigger dot. Sequence s's tiles are the program ids
[q_start[s] // BLOCK_M + s, + cdiv(q_len[s], BLOCK_M)): these ranges never overlap and fit below T //
BLOCK_M + S (the layout contract), so the grid depends on shapes only; a program finds its sequence by
counting the sequences whose first tile is at or below its own (one vector load of q_start, S padded to
a power of two; `seq_search="binary"`, a binary search, takes log2 S dependent loads), and a program
past its sequence's q_len (or before the first sequence) exits at once. The program walks the positions
[lo(first token), last token] in tiles of BLOCK_N (causal: nothing above the tile's last position is
visited; with a window, nothing below its first token's window), gathers the tile's block ids from the
block table (`prefetch_table=True` loads them one tile ahead, beside the current tile's K/V; off by
default: on an H100 it cost 1-3 us per call and saved nothing, benchmarks/RESULTS.md; masked: only positions < seq_len are ever looked up, so padding table entries, whatever their
value, are never used as addresses), loads K and V [BLOCK_N, D], S = (q * scale * log2 e) @ K^T in
float32 with the per-row mask lo(p_row) <= j <= p_row, an online softmax in base 2 (rows that have seen
no valid position yet keep m = -inf without producing NaN), acc += P @ V with P rounded to the cache
dtype (flash attention). Rows with no valid position at all write zeros.

Decode vs prefill: the tile height is a constexpr, BLOCK_M tokens per program (`default_block_m`, from
shapes only): BLOCK_M * GROUP_PAD = 16 rows unless the step is prefill-heavy (T > 8 S: more than eight
tokens per sequence on average), then 64 rows (32 at head_dim 256). A q_len 1 token in a 16-row tile is exactly
the decode kernel's program: one [16, D] x [D, BLOCK_N] dot per K/V tile, one K/V pass per (sequence, kv
head), the same grid size (plus at most T // BLOCK_M programs that exit after the search). 64-row tiles
serve prefill: each K/V tile read from memory feeds 64 query rows (4x fewer K/V passes over a chunk than
16 rows); a decode token in one only wastes tensor-core work, never memory traffic. Measured on the
H200 (benchmarks/RESULTS.md, 2026-11-29): for 30 decode tokens + one 128-token chunk (T = 158, S = 31)
16-row tiles with 4 warps take 23.6 us a call and 64-row tiles with 8 warps 39 us, so a decode batch
with a chunk of its size keeps 16-row tiles; 64 rows are for long prefills. num_warps
(`default_num_warps`): 4 for 16-row tiles (as fast as 8 on pure decode, 1.3x faster on that mixed step),
else 8 for head_dim * BLOCK_N >= 128 * 64, else 4.
Long contexts with few programs: split-K (flash-decoding) as in the decode kernel: with num_splits > 1
split k covers positions [k P, (k + 1) P) and writes float32 partials (m, l, acc) per token and head;
`_varlen_reduce_kernel`, grid (num_tiles, Hkv), merges the splits that hold work for its tile.
`default_partition` splits only when the grid has fewer programs than SMs (a few sequences with long
contexts: the decode kernel's measured rule) and caps the partials' memory at 64 MiB.

Inputs: cache dtype float32, bfloat16 or float16; q of the same dtype; out optional [T, H, D] of q's dtype;
head_dim a power of two in 16..256; any block_size >= 1. float32 uses IEEE float32 dots (not tf32); under
Triton's interpreter half-precision dots go up to float32 (its bfloat16 dot is wrong, see lora_triton.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorascope.kernels._triton import HAS_TRITON, tl, triton
from lorascope.kernels._triton import INTERPRETED as _INTERPRETED
from lorascope.kernels._triton import NUM_SMS as _NUM_SMS
from lorascope.kernels._triton import next_pow2 as _next_pow2

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PARTIAL_BYTES = 64 << 20  # split-K partials (float32 m, l, acc) stay under this
# How a program finds its sequence and whether it loads a K/V tile's block ids one tile ahead (the
# module docstring); a dict so benchmarks can A/B them on captured steps (benchmarks/gpu_step_ab.py).
# `table_in_registers` loads a program's whole block-table row (up to _MAX_TABLE_REGS entries) once, before the
# loop, and takes each tile's ids from it by a register gather (no load inside the loop's address chain);
# `prefetch_kv` loads the next tile's K/V before the current tile's dots (a software pipeline by hand).
TUNING: dict[str, str | bool] = {"seq_search": "vector", "prefetch_table": False, "table_in_registers": False,
                                 "prefetch_kv": False}
_MAX_TABLE_REGS = 256


def default_block_n(head_dim: int) -> int:
    """Positions per K/V tile: 64 up to head_dim 128, 32 above (as the decode kernel)."""
    return 64 if head_dim <= 128 else 32


def default_block_m(num_tokens: int, capacity: int, group: int, head_dim: int) -> int:
    """Query tokens per program, from shapes only: tiles of 16 rows (BLOCK_M * GROUP_PAD) unless the step
    is prefill-heavy (num_tokens > 8 * capacity), then 64 rows (32 for head_dim 256); at least one token."""
    rows = 16 if num_tokens <= 8 * capacity else (64 if head_dim <= 128 else 32)
    return max(1, rows // _next_pow2(group))


def default_num_warps(head_dim: int, block_n: int, rows: int = 64) -> int:
    """4 warps for tiles of at most 16 rows (BLOCK_M * GROUP_PAD); else 8 once a K/V tile holds 128 x 64
    elements (head_dim 128 and 256 at the default block_n), else 4. ptxas for sm_90 (Triton 3.9, bf16):
    at head_dim 128, block_n 64, 4 warps spill (216 bytes at 16 rows, 400 at 64: 255 registers), 8
    warps do not (~222 registers, 16 to 128 rows); head_dim 64 with 4 warps does not spill. At 16 rows
    the spill costs less than the second program per SM that 4 warps allow: measured on the H200, 4
    warps are as fast as 8 on 32 decode tokens and 1.3x faster with a 128-token chunk beside them."""
    if rows <= 16:
        return 4
    return 8 if head_dim * block_n >= 128 * 64 else 4


def num_tiles(num_tokens: int, capacity: int, block_m: int) -> int:
    """The grid's first dimension: enough query tiles for any layout of num_tokens over capacity sequences."""
    return num_tokens // block_m + capacity


def default_partition(
    tiles: int, kv_heads: int, max_context: int, block_n: int, num_tokens: int, heads: int, head_dim: int
) -> int | None:
    """Split-K partition (positions) from shapes alone, or None for the single pass.

    As the decode kernel's heuristic (measured there on an H200): split when the grid has fewer programs
    than SMs and the table is wider than 128 positions, P = 128; P grows (in BLOCK_N steps) until the
    float32 partials (num_tokens x heads x splits x (head_dim + 2)) fit in 64 MiB.
    """
    if tiles * kv_heads >= _NUM_SMS or max_context <= 128:
        return None
    partition = max(block_n, 128 // block_n * block_n)
    per_split = max(1, num_tokens) * heads * (head_dim + 2) * 4
    max_splits = max(1, _PARTIAL_BYTES // per_split)
    if -(-max_context // partition) > max_splits:
        partition = -(-max_context // max_splits)
        partition = -(-partition // block_n) * block_n
    return partition


# ---------------------------------------------------------------- metadata (fixed capacity, in place)


@dataclass(slots=True)
class VarlenMetadata:
    """The kernel's int32 metadata at a fixed capacity, as views of one packed device tensor
    [capacity, 3 + max_blocks] (columns q_start, q_len, seq_len, then the block table), so that
    `update_varlen_metadata` rewrites all of it with one host-to-device copy, in place."""

    packed: torch.Tensor  # [capacity, 3 + max_blocks] int32
    q_start: torch.Tensor  # [capacity] (a strided view of packed)
    q_len: torch.Tensor  # [capacity], 0 for padding sequences
    seq_lens: torch.Tensor  # [capacity], the new tokens included
    block_tables: torch.Tensor  # [capacity, max_blocks] (rows strided by 3 + max_blocks)
    block_size: int

    @property
    def capacity(self) -> int:
        return int(self.q_len.shape[0])

    @property
    def max_blocks(self) -> int:
        return int(self.block_tables.shape[1])


def _pack(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    capacity: int,
    max_blocks: int,
) -> np.ndarray:
    """[capacity, 3 + max_blocks] int32 rows (q_start, q_len, seq_len, table...), host side, validated."""
    if not (len(q_lens) == len(kv_lens) == len(block_tables)):
        raise ValueError(
            f"q_lens, kv_lens, block_tables differ in length: {len(q_lens)}, {len(kv_lens)}, {len(block_tables)}"
        )
    if len(q_lens) > capacity:
        raise ValueError(f"{len(q_lens)} sequences exceed the capacity {capacity}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    packed = np.zeros((capacity, 3 + max_blocks), dtype=np.int32)
    start = 0
    for s, (q_len, kv_len, table) in enumerate(zip(q_lens, kv_lens, block_tables, strict=True)):
        need = -(-kv_len // block_size)
        if q_len < 0 or kv_len < q_len:
            raise ValueError(f"sequence {s}: q_len {q_len} must be in 0..kv_len {kv_len}")
        if need > max_blocks or len(table) < need:
            raise ValueError(
                f"sequence {s}: kv_len {kv_len} needs {need} blocks; table has {len(table)}, max_blocks {max_blocks}"
            )
        packed[s, 0:3] = (start, q_len, kv_len)
        packed[s, 3 : 3 + need] = table[:need]
        start += q_len
    packed[len(q_lens) :, 0] = start  # padding sequences: q_len 0, at the end of the used tokens
    return packed


def varlen_metadata(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    capacity: int,
    device: torch.device | str,
    max_blocks: int | None = None,
) -> VarlenMetadata:
    """Pack sequences laid out one after another (in list order) into fixed-capacity int32 tensors.

    q_lens[s] new tokens of sequence s, kv_lens[s] its context length (new tokens included),
    block_tables[s] its block ids (at least cdiv(kv_len, block_size)). Sequences past len(q_lens) are
    padding (q_len 0, seq_len 0, table zeros, q_start = the number of used tokens). max_blocks (default:
    the widest need) fixes the table width; later updates must fit in it.
    """
    if max_blocks is None:
        max_blocks = max([-(-n // block_size) for n in kv_lens] + [1]) if block_size >= 1 else 1
    packed = torch.from_numpy(_pack(q_lens, kv_lens, block_tables, block_size, capacity, max_blocks)).to(device)
    return VarlenMetadata(
        packed=packed,
        q_start=packed[:, 0],
        q_len=packed[:, 1],
        seq_lens=packed[:, 2],
        block_tables=packed[:, 3:],
        block_size=block_size,
    )


def update_varlen_metadata(
    buffers: VarlenMetadata,
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
) -> VarlenMetadata:
    """Rewrite `buffers` in place (same tensors: a captured CUDA graph sees the new values) with one
    host-to-device copy; returns it. Raises (before touching the buffers) when the step does not fit."""
    packed = _pack(q_lens, kv_lens, block_tables, buffers.block_size, buffers.capacity, buffers.max_blocks)
    buffers.packed.copy_(torch.from_numpy(packed))
    return buffers


# ---------------------------------------------------------------- the op


def paged_varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    partition_size: int | str | None = "auto",
    num_warps: int | None = None,
    num_stages: int | None = None,
    seq_search: str | None = None,
    prefetch_table: bool | None = None,
    table_in_registers: bool | None = None,
    prefetch_kv: bool | None = None,
) -> torch.Tensor:
    """Attention of a step's new tokens (any mix of prefill chunks and decode tokens); returns out [T, H, D].

    q [T, H, D]; k_cache, v_cache [rows, Hkv, D] (the new tokens' K/V already written); q_start, q_len,
    seq_lens [S] int32 and block_tables [S, max_blocks] int32 (the module docstring's layout contract;
    `varlen_metadata` packs them). out: written in place at the sequences' tokens only (None: a new
    zero-filled tensor). block_m (tokens per program, a power of two), block_n (positions per tile, a power
    of two >= 16), partition_size ("auto", None: single pass, or a multiple of block_n: split-K),
    num_warps and num_stages (Triton's software pipelining depth; None: Triton's default) override the
    shape-derived defaults (benchmarks, tuning); seq_search ("vector" or "binary": how a program finds
    its sequence), prefetch_table (block ids loaded one K/V tile ahead), table_in_registers and prefetch_kv
    override `TUNING` (none changes the arithmetic). No host sync,
    and the launch depends only on shapes: capturable in a CUDA graph.
    """
    if not HAS_TRITON:
        raise RuntimeError("paged_varlen_attention needs triton (pip install -e '.[gpu]')")
    tokens, heads, head_dim = _check(q, k_cache, v_cache, q_start, q_len, seq_lens, block_tables, block_size, out)
    capacity = q_len.shape[0]
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    group_pad = _next_pow2(group)
    if out is None:
        out = torch.zeros_like(q)
    window = 0 if sliding_window is None else int(sliding_window)
    if sliding_window is not None and window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if block_n is None:
        block_n = default_block_n(head_dim)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if block_m is None:
        block_m = default_block_m(tokens, capacity, group, head_dim)
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 1, got {block_m}")
    block_m = max(block_m, 16 // group_pad)  # tl.dot needs >= 16 rows
    if tokens == 0 or capacity == 0:
        return out
    seq_search = TUNING["seq_search"] if seq_search is None else seq_search
    prefetch_table = TUNING["prefetch_table"] if prefetch_table is None else prefetch_table
    if seq_search not in ("vector", "binary"):
        raise ValueError(f"seq_search must be 'vector' or 'binary', got {seq_search!r}")
    table_in_registers = TUNING["table_in_registers"] if table_in_registers is None else table_in_registers
    prefetch_kv = TUNING["prefetch_kv"] if prefetch_kv is None else prefetch_kv
    table_pad = _next_pow2(block_tables.shape[1]) if table_in_registers else 0
    if table_pad > _MAX_TABLE_REGS:
        table_pad = 0  # a table this wide stays in memory
    tiles = num_tiles(tokens, capacity, block_m)
    max_context = block_tables.shape[1] * block_size
    if partition_size == "auto":
        partition_size = default_partition(tiles, kv_heads, max_context, block_n, tokens, heads, head_dim)
    if partition_size is not None and (
        not isinstance(partition_size, int) or partition_size <= 0 or partition_size % block_n
    ):
        raise ValueError(f"partition_size {partition_size} must be a positive multiple of block_n {block_n}")
    num_splits = 1 if partition_size is None else max(1, triton.cdiv(max_context, partition_size))
    if num_splits == 1:
        partition_size = max(block_n, triton.cdiv(max(max_context, 1), block_n) * block_n)
    upcast = k_cache.dtype == torch.float32 or _INTERPRETED
    qk_scale = float(scale) * _LOG2E
    if num_splits == 1:
        part_m = part_l = part_acc = out  # unused by the single pass (SPLIT=False)
        acc_strides: tuple[int, ...] = (0, 0, 0)
        ml_strides: tuple[int, ...] = (0, 0)
    else:
        part_acc = torch.empty((tokens, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((tokens, heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        acc_strides = tuple(part_acc.stride()[:3])
        ml_strides = tuple(part_m.stride()[:2])
    meta_strides = (q_start.stride(0), q_len.stride(0), seq_lens.stride(0), *block_tables.stride())
    consts = {
        "GROUP": group,
        "GROUP_PAD": group_pad,
        "BLOCK_M": block_m,
        "HEAD_DIM": head_dim,
        "BLOCK_SIZE": block_size,
        "HAS_WINDOW": window > 0,
        "SEQ_PAD": _next_pow2(capacity) if seq_search == "vector" else 0,
    }
    rows = block_m * group_pad
    launch = {"num_warps": default_num_warps(head_dim, block_n, rows) if num_warps is None else num_warps}
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _varlen_kernel[(tiles, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        q_start,
        q_len,
        seq_lens,
        block_tables,
        out,
        part_m,
        part_l,
        part_acc,
        qk_scale,
        window,
        tokens,
        capacity,
        block_tables.shape[1],
        partition_size,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *meta_strides,
        *out.stride(),
        *acc_strides,
        *ml_strides,
        BLOCK_N=block_n,
        SPLIT=num_splits > 1,
        UPCAST=upcast,
        PREFETCH_TABLE=bool(prefetch_table) and not table_pad and not prefetch_kv,
        TABLE_PAD=table_pad,
        PREFETCH_KV=bool(prefetch_kv),
        **consts,
        **launch,
    )
    if num_splits > 1:
        _varlen_reduce_kernel[(tiles, kv_heads)](
            q_start,
            q_len,
            seq_lens,
            out,
            part_m,
            part_l,
            part_acc,
            window,
            tokens,
            capacity,
            block_tables.shape[1],
            partition_size,
            *meta_strides,
            *out.stride(),
            *acc_strides,
            *ml_strides,
            **consts,
            **launch,
        )
    return out


def _check(q, k_cache, v_cache, q_start, q_len, seq_lens, block_tables, block_size, out) -> tuple[int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q must be [T, H, D] and k_cache, v_cache one shape [rows, Hkv, D]; got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    tokens, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} and the cache {tuple(k_cache.shape)} do not fit (H % Hkv, D)")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {head_dim}")
    if len({q.dtype, k_cache.dtype, v_cache.dtype}) != 1 or q.dtype not in _DTYPES:
        raise ValueError(
            f"q, k_cache, v_cache must share one dtype of float32/bfloat16/float16, got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if q_len.dim() != 1 or q_len.dtype != torch.int32:
        raise ValueError(f"q_len must be int32 [S], got {q_len.dtype} {tuple(q_len.shape)}")
    capacity = q_len.shape[0]
    for name, t in (("q_start", q_start), ("seq_lens", seq_lens)):
        if t.shape != (capacity,) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 [S={capacity}], got {t.dtype} {tuple(t.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != capacity or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 [S={capacity}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, q_start, q_len, seq_lens, block_tables)}
    if out is not None:
        devices.add(out.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return tokens, heads, head_dim


def reference_varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The semantics in plain torch, float64 on the CPU, one sequence at a time (host loop: tests only).
    Tokens of no sequence are zeros. Expects valid metadata (the layout contract, q_len <= seq_len)."""
    tokens, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    tables = block_tables.long().cpu()
    for s, (q0, ql, n) in enumerate(zip(q_start.tolist(), q_len.tolist(), seq_lens.tolist(), strict=True)):
        if ql <= 0:
            continue
        if not (q0 >= 0 and q0 + ql <= tokens and ql <= n):
            raise ValueError(f"sequence {s}: q_start {q0}, q_len {ql}, seq_len {n} break the layout contract")
        pos = torch.arange(n)
        rows = (tables[s, pos // block_size] * block_size + pos % block_size).to(k_cache.device)
        k = k_cache[rows].double().cpu().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache[rows].double().cpu().repeat_interleave(group, dim=1)
        qs = q[q0 : q0 + ql].double().cpu()  # [ql, H, D]
        p = torch.arange(n - ql, n)[:, None]
        allowed = pos[None, :] <= p
        if sliding_window is not None:
            allowed &= pos[None, :] > p - sliding_window
        scores = torch.einsum("qhd,nhd->hqn", qs, k) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[q0 : q0 + ql] = torch.einsum("hqn,nhd->qhd", torch.softmax(scores, dim=-1), v)
    return out


if HAS_TRITON:

    @triton.jit
    def _tile_of(
        tile,
        qs_ptr,
        ql_ptr,
        len_ptr,
        window,
        num_tokens,
        num_seqs,
        max_blocks,
        s_qs,
        s_ql,
        s_len,
        BLOCK_M: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        SEQ_PAD: tl.constexpr,
    ):
        """(sequence, q0, ql, ctx0, i0, first, last, has_tile) of program `tile`: the tile's tokens are
        i0 .. min(i0 + BLOCK_M, ql) - 1 of sequence s (flat q0 + i), at positions ctx0 + i; the positions
        it reads are [first, last)."""
        # the largest s with q_start[s] // BLOCK_M + s <= tile (strictly increasing in s: the contract)
        if SEQ_PAD > 0:  # one vector load of q_start, then a count: one memory latency
            idx = tl.arange(0, SEQ_PAD)
            in_seq = idx < num_seqs
            vals = tl.minimum(tl.maximum(tl.load(qs_ptr + idx * s_qs, mask=in_seq, other=0), 0), num_tokens)
            s = tl.sum((in_seq & (vals // BLOCK_M + idx <= tile)).to(tl.int32), axis=0) - 1
        else:  # a binary search: log2 S dependent loads
            left: tl.int32 = 0
            right: tl.int32 = num_seqs
            while left < right:
                mid = (left + right) // 2
                val = tl.minimum(tl.maximum(tl.load(qs_ptr + mid * s_qs), 0), num_tokens)
                if val // BLOCK_M + mid <= tile:
                    left = mid + 1
                else:
                    right = mid
            s = left - 1
        s_safe = tl.maximum(s, 0)
        q0 = tl.minimum(tl.maximum(tl.load(qs_ptr + s_safe * s_qs), 0), num_tokens)
        ql = tl.minimum(tl.maximum(tl.load(ql_ptr + s_safe * s_ql), 0), num_tokens - q0)
        n = tl.minimum(tl.maximum(tl.load(len_ptr + s_safe * s_len), 0), max_blocks * BLOCK_SIZE)
        i0 = (tile - (q0 // BLOCK_M + s_safe)) * BLOCK_M
        ctx0 = n - ql
        last = tl.maximum(ctx0 + tl.minimum(i0 + BLOCK_M, ql), 0)  # one past the last token's position
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(ctx0 + i0 - window + 1, 0)
        return s_safe, q0, ql, ctx0, i0, first, last, (s >= 0) & (i0 < ql)

    @triton.jit
    def _kv_tile(start, first, p_end, table, bt_row, sbt_n, k_base, v_base, sk_r, sv_r, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, TABLE_PAD: tl.constexpr):
        """K and V [BLOCK_N, D] at positions start .. start + BLOCK_N - 1 (zeros outside [first, p_end)); the
        block ids gathered from `table` (the row in registers) with TABLE_PAD, else loaded from the table."""
        j = start + tl.arange(0, BLOCK_N)
        j_ok = (j >= first) & (j < p_end)
        if TABLE_PAD > 0:
            blk = tl.gather(table, tl.where(j_ok, j // BLOCK_SIZE, 0), 0).to(tl.int64)
        else:
            blk = tl.load(bt_row + (j // BLOCK_SIZE) * sbt_n, mask=j_ok, other=0).to(tl.int64)
        rows = blk * BLOCK_SIZE + (j % BLOCK_SIZE)
        k = tl.load(k_base + rows[:, None] * sk_r, mask=j_ok[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * sv_r, mask=j_ok[:, None], other=0.0)
        return k, v

    @triton.jit
    def _varlen_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        qs_ptr,
        ql_ptr,
        len_ptr,
        bt_ptr,
        out_ptr,
        pm_ptr,
        pl_ptr,
        pacc_ptr,
        qk_scale,
        window,
        num_tokens,
        num_seqs,
        max_blocks,
        partition,
        sq_t,
        sq_h,
        sq_d,
        sk_r,
        sk_h,
        sk_d,
        sv_r,
        sv_h,
        sv_d,
        s_qs,
        s_ql,
        s_len,
        sbt_s,
        sbt_n,
        so_t,
        so_h,
        so_d,
        sa_t,
        sa_h,
        sa_s,
        sm_t,
        sm_h,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        SPLIT: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        UPCAST: tl.constexpr,
        SEQ_PAD: tl.constexpr,
        PREFETCH_TABLE: tl.constexpr,
        TABLE_PAD: tl.constexpr,
        PREFETCH_KV: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        s, q0, ql, ctx0, i0, first, last, has_tile = _tile_of(
            tile, qs_ptr, ql_ptr, len_ptr, window, num_tokens, num_seqs, max_blocks, s_qs, s_ql, s_len,
            BLOCK_M, BLOCK_SIZE, HAS_WINDOW, SEQ_PAD,
        )  # fmt: skip
        p_end = last
        t_first = first // BLOCK_N * BLOCK_N
        if SPLIT:
            p_start = split * partition
            p_end = tl.minimum(last, p_start + partition)
            t_first = tl.maximum(p_start, t_first)  # both multiples of BLOCK_N
            # a split with no position of this tile exits at once (the reduce never reads it)
            has_tile = has_tile & (t_first < p_end)

        ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
        if has_tile:
            offs_r = tl.arange(0, ROWS)
            tok = i0 + offs_r // GROUP_PAD
            hh = offs_r % GROUP_PAD
            row_ok = (tok < ql) & (hh < GROUP)
            t_idx = (q0 + tok).to(tl.int64)
            heads = kvh * GROUP + hh
            offs_d = tl.arange(0, HEAD_DIM)
            q = tl.load(
                q_ptr + t_idx[:, None] * sq_t + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=row_ok[:, None],
                other=0.0,
            )
            p_row = ctx0 + tok  # each row's position (its token's)
            lo_row = tl.zeros((ROWS,), dtype=tl.int32)
            if HAS_WINDOW:
                lo_row = tl.maximum(p_row - window + 1, 0)

            m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
            l_sum = tl.zeros((ROWS,), dtype=tl.float32)
            acc = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
            bt_row = bt_ptr + s.to(tl.int64) * sbt_s
            k_base = k_ptr + kvh * sk_h + offs_d[None, :] * sk_d
            v_base = v_ptr + kvh * sv_h + offs_d[None, :] * sv_d
            table = 0  # with TABLE_PAD: the row's used entries, once; tiles gather their ids from registers
            if TABLE_PAD > 0:
                offs_b = tl.arange(0, TABLE_PAD)
                table = tl.load(bt_row + offs_b * sbt_n, mask=offs_b < tl.cdiv(p_end, BLOCK_SIZE), other=0)
            if PREFETCH_TABLE:
                j = t_first + tl.arange(0, BLOCK_N)
                blk_next = tl.load(bt_row + (j // BLOCK_SIZE) * sbt_n, mask=(j >= first) & (j < p_end), other=0)
            if PREFETCH_KV:  # the first tile's K/V before the loop
                k_next, v_next = _kv_tile(t_first, first, p_end, table, bt_row, sbt_n, k_base, v_base, sk_r, sv_r,
                                          BLOCK_N, BLOCK_SIZE, TABLE_PAD)
            for t in range(t_first, p_end, BLOCK_N):  # bounds live on the device: no host sync
                j = t + tl.arange(0, BLOCK_N)
                j_ok = (j >= first) & (j < p_end)  # < seq_len: the table is read at used entries only
                if PREFETCH_KV:  # this tile's K/V came in during the last tile's dots; start the next one's
                    k = k_next
                    v = v_next
                    k_next, v_next = _kv_tile(t + BLOCK_N, first, p_end, table, bt_row, sbt_n, k_base, v_base, sk_r,
                                              sv_r, BLOCK_N, BLOCK_SIZE, TABLE_PAD)
                elif not PREFETCH_TABLE:
                    k, v = _kv_tile(t, first, p_end, table, bt_row, sbt_n, k_base, v_base, sk_r, sv_r, BLOCK_N,
                                    BLOCK_SIZE, TABLE_PAD)  # [BLOCK_N, D] each
                else:  # this tile's block ids were loaded one tile ahead
                    rows = blk_next.to(tl.int64) * BLOCK_SIZE + (j % BLOCK_SIZE)
                    k = tl.load(k_base + rows[:, None] * sk_r, mask=j_ok[:, None], other=0.0)
                    v = tl.load(v_base + rows[:, None] * sv_r, mask=j_ok[:, None], other=0.0)
                    jn = j + BLOCK_N  # the next tile's block ids, in flight beside this tile's K/V
                    blk_next = tl.load(bt_row + (jn // BLOCK_SIZE) * sbt_n, mask=(jn >= first) & (jn < p_end), other=0)
                if UPCAST:
                    sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    sc = tl.dot(q, tl.trans(k))
                ok = row_ok[:, None] & j_ok[None, :] & (j[None, :] <= p_row[:, None]) & (j[None, :] >= lo_row[:, None])
                sc = tl.where(ok, sc * qk_scale, float("-inf"))  # [ROWS, BLOCK_N], log2 units
                m_new = tl.maximum(m, tl.max(sc, axis=1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid position yet
                alpha = tl.exp2(m - m_use)
                pr = tl.exp2(sc - m_use[:, None])
                l_sum = l_sum * alpha + tl.sum(pr, axis=1)
                if UPCAST:
                    pv = tl.dot(pr, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(pr.to(v_ptr.dtype.element_ty), v)
                acc = acc * alpha[:, None] + pv
                m = m_new

            if SPLIT:
                ml_off = t_idx * sm_t + heads * sm_h + split
                tl.store(pm_ptr + ml_off, m, mask=row_ok)
                tl.store(pl_ptr + ml_off, l_sum, mask=row_ok)
                a_ptrs = pacc_ptr + t_idx[:, None] * sa_t + heads[:, None] * sa_h + split * sa_s + offs_d[None, :]
                tl.store(a_ptrs, acc, mask=row_ok[:, None])
            else:
                res = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # no valid position: zeros
                o_ptrs = out_ptr + t_idx[:, None] * so_t + heads[:, None] * so_h + offs_d[None, :] * so_d
                tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _varlen_reduce_kernel(
        qs_ptr,
        ql_ptr,
        len_ptr,
        out_ptr,
        pm_ptr,
        pl_ptr,
        pacc_ptr,
        window,
        num_tokens,
        num_seqs,
        max_blocks,
        partition,
        s_qs,
        s_ql,
        s_len,
        sbt_s,
        sbt_n,
        so_t,
        so_h,
        so_d,
        sa_t,
        sa_h,
        sa_s,
        sm_t,
        sm_h,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        SEQ_PAD: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        _s, q0, ql, _ctx0, i0, first, last, has_tile = _tile_of(
            tile, qs_ptr, ql_ptr, len_ptr, window, num_tokens, num_seqs, max_blocks, s_qs, s_ql, s_len,
            BLOCK_M, BLOCK_SIZE, HAS_WINDOW, SEQ_PAD,
        )  # fmt: skip
        ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
        if has_tile:
            offs_r = tl.arange(0, ROWS)
            tok = i0 + offs_r // GROUP_PAD
            hh = offs_r % GROUP_PAD
            row_ok = (tok < ql) & (hh < GROUP)
            t_idx = (q0 + tok).to(tl.int64)
            heads = kvh * GROUP + hh
            offs_d = tl.arange(0, HEAD_DIM)
            ml_base = t_idx * sm_t + heads * sm_h
            a_base = pacc_ptr + t_idx[:, None] * sa_t + heads[:, None] * sa_h + offs_d[None, :]
            m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
            l_sum = tl.zeros((ROWS,), dtype=tl.float32)
            acc = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
            # exactly the splits the main kernel wrote for this tile (those holding positions in [first, last));
            # a row may have no valid position in one of them (m = -inf, l = 0)
            for k in range(first // partition, tl.cdiv(last, partition)):
                m_k = tl.load(pm_ptr + ml_base + k, mask=row_ok, other=float("-inf"))
                l_k = tl.load(pl_ptr + ml_base + k, mask=row_ok, other=0.0)
                a_k = tl.load(a_base + k * sa_s, mask=row_ok[:, None], other=0.0)
                m_new = tl.maximum(m, m_k)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_use)
                beta = tl.exp2(m_k - m_use)
                l_sum = l_sum * alpha + l_k * beta
                acc = acc * alpha[:, None] + a_k * beta[:, None]
                m = m_new
            res = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
            o_ptrs = out_ptr + t_idx[:, None] * so_t + heads[:, None] * so_h + offs_d[None, :] * so_d
            tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


__all__ = [
    "HAS_TRITON",
    "VarlenMetadata",
    "default_block_m",
    "default_block_n",
    "default_num_warps",
    "default_partition",
    "num_tiles",
    "paged_varlen_attention",
    "reference_varlen_attention",
    "update_varlen_metadata",
    "varlen_metadata",
]
