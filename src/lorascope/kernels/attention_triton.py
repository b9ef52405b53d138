"""Paged decode attention on the GPU: one Triton kernel (plus an optional split-K reduce), no host sync.

    out[b, h] = softmax(scale * q[b, h] . K[b, kvh(h), lo:n]) @ V[b, kvh(h), lo:n]
    n = seq_lens[b] (the new token included), lo = max(0, n - sliding_window) (0 without a window),
    K[b, g, p] = k_cache[block_tables[b, p // block_size] * block_size + p % block_size, g]

The same semantics as kernels/attention.py's decode path (`AttentionMetadata.build`'s decode mask), but
every input is a fixed-shape device tensor (q [B, H, D], block_tables [B, max_blocks] int32, seq_lens
[B] int32), and nothing on the host depends on their values: no .item(), no data-dependent shape, no
Python branch on a tensor. The launch grid depends only on shapes, so one call captured in a CUDA graph
replays for any seq_lens / block_tables / q written in place (within max_blocks).

Kernel (`_decode_kernel`), grid (B, Hkv, num_splits). A program owns one (sequence, kv head) and the
GROUP = H / Hkv query heads that share it, so each K/V row is read from memory once per group. The query
heads are one [BLOCK_H, D] tile (BLOCK_H = GROUP padded to a power of two >= 16, tl.dot's smallest tile;
padding heads are masked on load and store). It walks its positions in tiles of BLOCK_N tokens: the tile's
block ids are gathered from the block table (p // block_size), the rows of K and V [BLOCK_N, D] loaded
with the mask `lo <= p < n`, scores S = (q * scale * log2 e) @ K^T [BLOCK_H, BLOCK_N] in float32, an
online softmax in base 2 (running max m, sum l, accumulator acc [BLOCK_H, D], float32), acc += P @ V with
P rounded to the cache dtype (as flash attention does). Every tile the loop visits holds at least one
valid position, so m is finite after the first and no NaN can appear; a sequence with no valid position
(a padded batch slot, seq_len 0) runs no tile and writes zeros (l = 0 -> 0). The block table is read only
at positions < n (masked), so padding entries, whatever their value, are never used as addresses; n is
clamped to [0, max_blocks * block_size], so a bad seq_len cannot read past the table either.

Split-K (flash-decoding): with num_splits > 1 split s covers positions [s * P, (s + 1) * P) (P =
partition_size, a multiple of BLOCK_N) and writes its (m, l, acc) to float32 buffers; `_reduce_kernel`,
grid (B, H), merges the splits that hold work (a loop bounded by n, on the device) and writes out.
num_splits = ceil(max_blocks * block_size / P), a function of shapes only; splits past a sequence's
context exit at once (no stores). Heuristic (partition_size="auto", `default_partition`): no split when
B * Hkv already gives a program per SM (e.g. B = 32, Hkv = 8 on an H200's 132 SMs), else P = 128 tokens.

Inputs: cache dtype float32, bfloat16 or float16; q of the same dtype; out (optional, preallocated
[B, H, D]) of q's dtype; head_dim a power of two in 16..256; any block_size >= 1 (powers of two are
cheapest). float32 caches use IEEE float32 dots (not tf32).
"""

from __future__ import annotations

import torch

from lorascope.kernels._triton import HAS_TRITON, tl, triton
from lorascope.kernels._triton import INTERPRETED as _INTERPRETED
from lorascope.kernels._triton import NUM_SMS as _NUM_SMS
from lorascope.kernels._triton import next_pow2 as _next_pow2

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_block_n(head_dim: int) -> int:
    """Tokens per tile: 64 up to head_dim 128, 32 above (register pressure of the [BLOCK_N, D] tiles)."""
    return 64 if head_dim <= 128 else 32


def default_partition(batch: int, kv_heads: int, max_context: int, block_n: int) -> int | None:
    """Split-K partition (tokens) from shapes alone, or None for the single pass.

    The single pass has B * Hkv programs. Measured on an H200 (benchmarks/gpu_attention.py, Llama-8B
    shape, graph replay): at B * Hkv = 256 splitting never won (it adds a launch and the partials'
    traffic); at B * Hkv = 32, P = 128 halved the time at context 1024 (35 -> 17.6 us) and did not lose
    at 256, also with a table 8192 tokens wide (empty splits exit at once). So: below one program per
    SM, P = 128 tokens.
    """
    if batch * kv_heads >= _NUM_SMS or max_context <= 128:
        return None
    return max(block_n, 128 // block_n * block_n)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    partition_size: int | str | None = "auto",
    block_n: int | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over its paged KV cache; returns out [B, H, D].

    q [B, H, D]; k_cache, v_cache [rows, Hkv, D] (the new tokens' K/V already written); block_tables
    [B, max_blocks] int32; seq_lens [B] int32, the context length including the new token (0: a padded
    batch slot, whose output is zeros). partition_size: "auto" (the heuristic), None (single pass) or a
    multiple of block_n (split-K, flash-decoding); block_n overrides the tile size (benchmarks, tuning).
    No host sync, and the launch depends only on shapes: capturable in a CUDA graph.
    """
    if not HAS_TRITON:
        raise RuntimeError("paged_decode_attention needs triton (pip install -e '.[gpu]')")
    batch, heads, head_dim = _check(q, k_cache, v_cache, block_tables, seq_lens, block_size, out)
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if block_n is None:
        block_n = default_block_n(head_dim)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    max_context = block_tables.shape[1] * block_size
    if partition_size == "auto":
        partition_size = default_partition(batch, kv_heads, max_context, block_n)
    if partition_size is not None and (partition_size <= 0 or partition_size % block_n):
        raise ValueError(f"partition_size {partition_size} must be a positive multiple of block_n {block_n}")
    window = 0 if sliding_window is None else int(sliding_window)
    if sliding_window is not None and window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    num_splits = 1 if partition_size is None else max(1, triton.cdiv(max_context, partition_size))
    if num_splits == 1:
        partition_size = max(block_n, triton.cdiv(max(max_context, 1), block_n) * block_n)
    block_h = max(16, _next_pow2(group))
    # float32 caches: IEEE float32 dots (not tf32); half types under the interpreter: see _INTERPRETED
    upcast = k_cache.dtype == torch.float32 or _INTERPRETED
    qk_scale = float(scale) * _LOG2E
    if num_splits == 1:
        part_m = part_l = part_acc = out  # unused by the single pass (SPLIT=False)
        acc_strides = (0, 0, 0)
        ml_strides = (0, 0)
    else:
        part_acc = torch.empty((batch, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        acc_strides = part_acc.stride()[:3]
        ml_strides = part_m.stride()[:2]
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_m, part_l, part_acc,
        qk_scale, window, block_tables.shape[1], partition_size,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1), seq_lens.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        *acc_strides, *ml_strides,
        GROUP=group, BLOCK_H=block_h, HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        SPLIT=num_splits > 1, HAS_WINDOW=window > 0, UPCAST=upcast,
    )
    if num_splits > 1:
        _reduce_kernel[(batch, heads)](
            part_m, part_l, part_acc, seq_lens, out, window, max_context, partition_size,
            *acc_strides, *ml_strides, seq_lens.stride(0), out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, HAS_WINDOW=window > 0,
        )
    return out


def _check(q, k_cache, v_cache, block_tables, seq_lens, block_size, out) -> tuple[int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q must be [B, H, D] and k_cache, v_cache one shape [rows, Hkv, D]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} and the cache {tuple(k_cache.shape)} do not fit (H % Hkv, D)")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {head_dim}")
    if len({q.dtype, k_cache.dtype, v_cache.dtype}) != 1 or q.dtype not in _DTYPES:
        raise ValueError(f"q, k_cache, v_cache must share one dtype of float32/bfloat16/float16, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [B={batch}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [B={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if out is not None:
        devices.add(out.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return batch, heads, head_dim


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The semantics in plain torch, float64, one sequence at a time (host loop: tests only)."""
    batch, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    tables, lens = block_tables.long().cpu(), seq_lens.cpu().tolist()
    for b in range(batch):
        n = lens[b]
        lo = 0 if sliding_window is None else max(0, n - sliding_window)
        if n <= 0:
            continue
        pos = torch.arange(lo, n)
        rows = (tables[b, pos // block_size] * block_size + pos % block_size).to(k_cache.device)
        k = k_cache[rows].double().cpu().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache[rows].double().cpu().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double().cpu(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
    return out


if HAS_TRITON:

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, out_ptr, pm_ptr, pl_ptr, pacc_ptr,
        qk_scale, window, max_blocks, partition,
        sq_b, sq_h, sq_d, sk_r, sk_h, sk_d, sv_r, sv_h, sv_d, sbt_b, sbt_n, s_len,
        so_b, so_h, so_d, sa_b, sa_h, sa_s, sm_b, sm_h,
        GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n = tl.load(len_ptr + b * s_len)
        n = tl.minimum(tl.maximum(n, 0), max_blocks * BLOCK_SIZE)  # never past the block table
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(n - window, 0)
        p_start = split * partition
        p_end = tl.minimum(p_start + partition, n)
        first = tl.maximum(p_start, lo // BLOCK_N * BLOCK_N)  # tile-aligned: p_start is a multiple too

        # an empty split (past the context or before the window) exits at once: the reduce never reads it
        if (first < p_end) | (not SPLIT):
            offs_h = tl.arange(0, BLOCK_H)
            h_ok = offs_h < GROUP
            heads = kvh * GROUP + offs_h
            offs_d = tl.arange(0, HEAD_DIM)
            q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                        mask=h_ok[:, None], other=0.0)

            m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
            l_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_H, HEAD_DIM), dtype=tl.float32)
            bt_row = bt_ptr + b.to(tl.int64) * sbt_b
            k_base = k_ptr + kvh * sk_h + offs_d[None, :] * sk_d
            v_base = v_ptr + kvh * sv_h + offs_d[None, :] * sv_d
            for t in range(first, p_end, BLOCK_N):  # bounds live on the device: no host sync
                p = t + tl.arange(0, BLOCK_N)
                valid = (p >= lo) & (p < p_end)
                blk = tl.load(bt_row + (p // BLOCK_SIZE) * sbt_n, mask=valid, other=0).to(tl.int64)
                rows = blk * BLOCK_SIZE + (p % BLOCK_SIZE)
                k = tl.load(k_base + rows[:, None] * sk_r, mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
                v = tl.load(v_base + rows[:, None] * sv_r, mask=valid[:, None], other=0.0)
                if UPCAST:
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N], log2 units
                m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every visited tile has a valid position
                alpha = tl.exp2(m - m_new)
                pr = tl.exp2(s - m_new[:, None])
                l_sum = l_sum * alpha + tl.sum(pr, axis=1)
                if UPCAST:
                    pv = tl.dot(pr, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(pr.to(v_ptr.dtype.element_ty), v)
                acc = acc * alpha[:, None] + pv
                m = m_new

            if SPLIT:
                ml_off = b.to(tl.int64) * sm_b + heads * sm_h + split
                tl.store(pm_ptr + ml_off, m, mask=h_ok)
                tl.store(pl_ptr + ml_off, l_sum, mask=h_ok)
                a_ptrs = pacc_ptr + b.to(tl.int64) * sa_b + heads[:, None] * sa_h + split * sa_s + offs_d[None, :]
                tl.store(a_ptrs, acc, mask=h_ok[:, None])
            else:
                res = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # no position (seq_len 0): zeros
                o_ptrs = out_ptr + b.to(tl.int64) * so_b + heads[:, None] * so_h + offs_d[None, :] * so_d
                tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])

    @triton.jit
    def _reduce_kernel(
        pm_ptr, pl_ptr, pacc_ptr, len_ptr, out_ptr, window, max_context, partition,
        sa_b, sa_h, sa_s, sm_b, sm_h, s_len, so_b, so_h, so_d,
        HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(len_ptr + b * s_len)
        n = tl.minimum(tl.maximum(n, 0), max_context)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(n - window, 0)
        offs_d = tl.arange(0, HEAD_DIM)
        ml_base = b.to(tl.int64) * sm_b + h * sm_h
        a_base = pacc_ptr + b.to(tl.int64) * sa_b + h * sa_h + offs_d
        m = tl.full((), float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros((), dtype=tl.float32)
        acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
        # only the splits holding positions in [lo, n) were written with work; each has a finite max
        for s in range(lo // partition, tl.cdiv(n, partition)):
            m_s = tl.load(pm_ptr + ml_base + s)
            l_s = tl.load(pl_ptr + ml_base + s)
            a_s = tl.load(a_base + s * sa_s)
            m_new = tl.maximum(m, m_s)
            alpha = tl.exp2(m - m_new)
            beta = tl.exp2(m_s - m_new)
            l_sum = l_sum * alpha + l_s * beta
            acc = acc * alpha + a_s * beta
            m = m_new
        res = acc / tl.where(l_sum > 0, l_sum, 1.0)
        tl.store(out_ptr + b.to(tl.int64) * so_b + h * so_h + offs_d * so_d, res.to(out_ptr.dtype.element_ty))


__all__ = ["HAS_TRITON", "default_block_n", "default_partition", "paged_decode_attention",
           "reference_decode_attention"]
