"""Grouped LoRA on the GPU: Triton kernels with exactly `lora_grouped`'s meaning (kernels/lora.py).

    y[t] += scale[s] * B[s, :, :r] @ (A[s, :r] @ x[t])   for the tokens t of each segment (start, end, s)

The modules that read the same x (q/k/v, or gate/up) go through one kernel pair together
(`lora_multi_triton`; `lora_grouped_triton` is the one-module case):
1. shrink: u[m, t, :R] = scale_m * x[t] @ A_m[slot, :R]^T, R = r_max padded to a power of two >= 16
   (tl.dot's smallest tile). Grid (segment, token tile, module x K split): every program reads its
   segment's rows of x and one K chunk (tiles of 256) of one module's A[slot]; split-K partials go to
   their own plane of a float32 buffer [M, SPLIT, T, R] (no atomics, no zero-fill: deterministic).
   Split-K (at most 4, aiming at ~2 programs per SM) fills the H200's SMs when a decode step has few
   segments; without it one program per adapter read its 128 KB of A latency-bound (23 us a launch).
2. expand: y_m[t, n] += (sum of the SPLIT planes of u[m, t]) @ B_m[slot, n, :R]^T. Grid (segment,
   token tile, output tile over the modules' outputs one after another): every output element belongs
   to one token and one program, so a plain load-add-store, no atomics.

Ranks: a slot's rows past its rank hold stale weights. Both kernels load A rows and B columns with the
mask `r < rank` (other=0), so stale rows contribute exact zeros; a segment of rank 0 or length 0 exits
at once. Each program reads only its own segment's slot: the weights read grow with the active adapters
and their ranks, never with S (the slots in the store); an m-tile re-reads its adapter's weights only for
segments longer than one token tile (prefill), and those re-reads mostly hit L2.

Metadata: `LoRAMeta.build(segments, ranks_by_module, scales_by_module, device)` packs, once per step,
the segments (start, length, slot) and every module's per-segment rank and scale into two small device
tensors (one host-to-device copy each, O(active segments), never O(S)). `meta[module]` gives the view
the ops take; every layer of that module reuses it. With `capacity=` the buffers have a
fixed size and the launch grid is fixed (padding segments have length 0 and exit at once), and
`meta.update(...)` rewrites them in place: the op then holds no host sync and no shape that changes
between steps, so a CUDA graph captured once replays for any batch within the capacity.

Inputs float32, bfloat16 or float16 (x, y, A, B of one dtype); the dots accumulate in float32 (float32
inputs use IEEE dots, not tf32); u is rounded to the weights' dtype before the expand dot, as torch's
`lora_grouped` rounds its shrunk product.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorascope.kernels.lora import check_shapes

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU engine never calls this module; `HAS_TRITON` says whether it can
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported: the CPU tests) computes
# bfloat16 dots wrongly and truncates float32 -> bfloat16 instead of rounding to nearest (triton 3.9);
# under it, bfloat16 dot operands go up to float32 (and results carry ~2x the bf16 rounding error).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_NUM_SMS = 132  # H200; the split-K heuristic aims at a few programs per SM


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_rank(r_max: int) -> int:
    """The rank tile both kernels use: the next power of two >= max(r_max, 16)."""
    return max(16, _next_pow2(r_max))


def _block_m(max_len: int) -> int:
    return min(64, max(16, _next_pow2(max_len)))


@dataclass(slots=True)
class LoRAModuleMeta:
    """One module's view of a step's LoRA metadata: what `lora_grouped_triton` reads.

    seg: int32 [3, n] device tensor (start, length, slot); rank: int32 [n]; scale: float32 [n];
    num_segments: the grid's segment axis (n, the capacity when fixed); max_len: the longest segment
    (a bound, when fixed), which sizes the token-tile axis.
    """

    seg: torch.Tensor
    rank: torch.Tensor
    scale: torch.Tensor
    num_segments: int
    max_len: int


class LoRAMeta:
    """Per-step LoRA metadata for the Triton op, built once per step and shared by every layer.

    The caller (the engine, where it makes the step's `LoRABatch`) builds it from the segments and
    the slot store's host-side lists (`store.ranks`, `store.scales`: module -> list over slots); only
    the active slots' entries are read, so the cost is O(segments x modules), not O(slots).
    """

    def __init__(self, ints: torch.Tensor, floats: torch.Tensor, modules: tuple[str, ...], num_segments: int,
                 max_len: int, capacity: int | None, max_len_bound: int | None):
        self.ints = ints  # int32 [3 + M, n]: start, length, slot, then one rank row per module
        self.floats = floats  # float32 [M, n]: one scale row per module
        self.modules = modules
        self.num_segments = num_segments
        self.max_len = max_len
        self.capacity = capacity
        self.max_len_bound = max_len_bound
        self._views = {m: LoRAModuleMeta(ints[:3], ints[3 + i], floats[i], num_segments, max_len)
                       for i, m in enumerate(modules)}  # views: update() rewrites what they see
        # update()'s host staging: pinned once (a pin_memory() per step costs a cudaHostAlloc)
        pin = ints.device.type == "cuda"
        self._host_ints = torch.empty(ints.shape, dtype=ints.dtype, pin_memory=pin) if capacity is not None else None
        self._host_floats = torch.empty(floats.shape, dtype=floats.dtype, pin_memory=pin) if capacity is not None else None

    @staticmethod
    def _host(segments: Sequence[tuple[int, int, int]], ranks_by_module: Mapping[str, Sequence[int]],
              scales_by_module: Mapping[str, Sequence[float]], modules: tuple[str, ...], n: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        pad = [0] * (n - len(segments))
        slots = [slot for _, _, slot in segments]
        int_rows = [[s for s, _, _ in segments] + pad, [e - s for s, e, _ in segments] + pad, slots + pad]
        float_rows = []
        for m in modules:
            ranks, scales = ranks_by_module[m], scales_by_module[m]
            int_rows.append([ranks[s] for s in slots] + pad)
            float_rows.append([float(scales[s]) for s in slots] + pad)
        # numpy builds from nested lists ~2x faster than torch.tensor (host time is per step)
        ints = torch.from_numpy(np.array(int_rows, dtype=np.int32).reshape(3 + len(modules), n))
        floats = torch.from_numpy(np.array(float_rows, dtype=np.float32).reshape(len(modules), n))
        return ints, floats

    @classmethod
    def build(cls, segments: Sequence[tuple[int, int, int]], ranks_by_module: Mapping[str, Sequence[int]],
              scales_by_module: Mapping[str, Sequence[float]], device: torch.device | str,
              capacity: int | None = None, max_len_bound: int | None = None) -> LoRAMeta:
        """Pack a step's segments and per-module ranks/scales into device tensors (two copies in all).

        capacity: fixed number of segment entries (e.g. max_num_seqs); with max_len_bound (e.g. the
        step's token budget) the launch grid no longer depends on the batch: what CUDA graphs need.
        """
        modules = tuple(ranks_by_module)
        n = len(segments) if capacity is None else capacity
        if len(segments) > n:
            raise ValueError(f"{len(segments)} segments exceed the metadata capacity {n}")
        ints, floats = cls._host(segments, ranks_by_module, scales_by_module, modules, n)
        longest = max((e - s for s, e, _ in segments), default=0)
        if max_len_bound is not None and longest > max_len_bound:
            raise ValueError(f"a segment of {longest} tokens exceeds max_len_bound {max_len_bound}")
        max_len = longest if max_len_bound is None else max_len_bound
        on = torch.device(device)
        pin = on.type == "cuda"
        return cls(_to(ints, on, pin), _to(floats, on, pin), modules, n, max_len, capacity, max_len_bound)

    def update(self, segments: Sequence[tuple[int, int, int]], ranks_by_module: Mapping[str, Sequence[int]],
               scales_by_module: Mapping[str, Sequence[float]]) -> None:
        """Rewrite a fixed-capacity meta in place (the tensors a captured graph reads stay the same)."""
        if self.capacity is None or self.max_len_bound is None:
            raise ValueError("update() needs a meta built with capacity= and max_len_bound=")
        if len(segments) > self.capacity:
            raise ValueError(f"{len(segments)} segments exceed the metadata capacity {self.capacity}")
        if any(e - s > self.max_len_bound for s, e, _ in segments):
            raise ValueError(f"a segment exceeds max_len_bound {self.max_len_bound}")
        ints, floats = self._host(segments, ranks_by_module, scales_by_module, self.modules, self.capacity)
        assert self._host_ints is not None and self._host_floats is not None
        # the previous step's copies out of the staging buffers finished before its logits reached the
        # host (sampling syncs), so rewriting them now is safe
        self._host_ints.copy_(ints)
        self._host_floats.copy_(floats)
        self.ints.copy_(self._host_ints, non_blocking=True)
        self.floats.copy_(self._host_floats, non_blocking=True)

    def __getitem__(self, module: str) -> LoRAModuleMeta:
        return self._views[module]


def _to(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if device.type == "cpu":
        return t
    if pin:
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def lora_grouped_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: Sequence[int] | None,
    scales: Sequence[float] | None,
    segments: Sequence[tuple[int, int, int]] | None,
    meta: LoRAModuleMeta | None = None,
    *,
    split_k: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """`lora_grouped` (kernels/lora.py) as two Triton kernels; y is updated in place and returned.

    With `meta` (from `LoRAMeta.build(...)[module]`, built once per step) ranks, scales and segments
    are not read (pass None) and the call does no host work beyond the launch. Without it, the
    metadata is built from the host lists on every call (fine for tests, wasteful per layer).
    split_k / block_n override the heuristics (benchmarks and tuning).
    """
    if not HAS_TRITON:
        raise RuntimeError("lora_grouped_triton needs triton (pip install -e '.[gpu]')")
    _check_shapes(x, y, a, b)
    if meta is None:
        if segments is None or ranks is None or scales is None:
            raise ValueError("pass either meta or ranks, scales and segments")
        if not segments:
            return y
        meta = LoRAMeta.build(segments, {"m": ranks}, {"m": scales}, x.device)["m"]
    lora_multi_triton(x, [(y, a, b, meta)], split_k=split_k, block_n=block_n)
    return y


def _check_shapes(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    check_shapes(x, y, a, b)
    if len({x.dtype, y.dtype, a.dtype, b.dtype}) != 1 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x, y, A, B must share one dtype of float32/bfloat16/float16, got "
                         f"{x.dtype}, {y.dtype}, {a.dtype}, {b.dtype}")
    if a.shape[1] > 128:
        raise ValueError(f"r_max {a.shape[1]} > 128 is not supported by the Triton LoRA kernels")


# --- several modules that read the same input (q/k/v, gate/up) in two launches, no split-K -----------

MAX_GROUP = 3
_MULTI_BLOCK_K = 256
_MULTI_MAX_SPLIT = 4


def lora_multi_triton(
    x: torch.Tensor,
    targets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, LoRAModuleMeta]],
    *,
    split_k: int | None = None,
    block_n: int | None = None,
) -> None:
    """`lora_grouped` for up to three modules that share the input x (q/k/v, or gate/up), in two
    launches for all of them: targets are (y, A, B, meta[module]) with A [S, R, in] of one shape,
    metas of one step (the same segments; ranks and scales per module). Each y is updated in place.

    1. shrink, grid (segment, token tile, module x K split): the split's partial of
       u[m, t, :R] = scale_m * x[t] @ A_m[slot, :R]^T into its own float32 plane [M, SPLIT, T, R] (no
       atomics: deterministic). K tiles of 256: one program without splits, reading a whole 8B-shape
       rank-16 A (128 KB) in 64-wide tiles, took 23 us (latency-bound: benchmarks/RESULTS.md).
    2. expand, grid (segment, token tile, output tile over the modules' outputs one after another):
       y_m[t, n] += sum of u's SPLIT planes (rounded to the weights' dtype) @ B_m[slot, n, :R]^T.
    Same masks and roundings as `lora_grouped_triton` (stale rank rows read as zero).
    """
    if not HAS_TRITON:
        raise RuntimeError("lora_multi_triton needs triton (pip install -e '.[gpu]')")
    if not 1 <= len(targets) <= MAX_GROUP:
        raise ValueError(f"lora_multi_triton takes 1..{MAX_GROUP} modules, got {len(targets)}")
    for y, a, b, _ in targets:
        _check_shapes(x, y, a, b)
    a0 = targets[0][1]
    if any(t[1].shape != a0.shape or t[1].stride() != a0.stride() for t in targets):
        raise ValueError("the grouped modules' A tensors must share one shape and layout [S, R, in]")
    meta = targets[0][3]
    tokens, fan_in = x.shape
    if meta.num_segments == 0 or meta.max_len == 0 or tokens == 0:
        return
    m = len(targets)
    padded = [*targets, *[targets[0]] * (MAX_GROUP - m)]  # unused pointer slots: never read
    r_pad = padded_rank(a0.shape[1])
    bm = _block_m(meta.max_len)
    m_tiles = triton.cdiv(meta.max_len, bm)
    widest = max(y.shape[1] for y, _, _, _ in targets)
    if block_n is None:
        block_n = 128 if widest >= 2048 else 64
    block_n = min(block_n, max(16, _next_pow2(widest)))
    tiles = [triton.cdiv(y.shape[1], block_n) for y, _, _, _ in padded]
    tiles[m:] = [0] * (MAX_GROUP - m)
    ieee = x.dtype == torch.float32 or (_INTERPRETED and x.dtype == torch.bfloat16)
    k_blocks = triton.cdiv(fan_in, _MULTI_BLOCK_K)
    if split_k is None:
        want = triton.cdiv(2 * _NUM_SMS, meta.num_segments * m_tiles * m)  # ~2 programs per SM
        split_k = min(_MULTI_MAX_SPLIT, _next_pow2(want))
    split = max(1, min(split_k, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * _MULTI_BLOCK_K
    split = triton.cdiv(fan_in, k_per_split)
    u = torch.empty((m, split, tokens, r_pad), dtype=torch.float32, device=x.device)
    (y0, a0_, b0, m0), (y1, a1, b1, m1), (y2, a2, b2, m2) = padded
    _shrink_multi_kernel[(meta.num_segments, m_tiles, m * split)](
        x, a0_, a1, a2, u, meta.seg, m0.rank, m1.rank, m2.rank, m0.scale, m1.scale, m2.scale, meta.seg.stride(0),
        fan_in, x.stride(0), x.stride(1), a0.stride(0), a0.stride(1), a0.stride(2), u.stride(0), u.stride(1),
        u.stride(2), K_PER_SPLIT=k_per_split, SPLIT=split, BLOCK_M=bm, BLOCK_K=_MULTI_BLOCK_K, R=r_pad, IEEE=ieee,
    )
    _expand_multi_kernel[(meta.num_segments, m_tiles, sum(tiles))](
        u, b0, b1, b2, y0, y1, y2, meta.seg, m0.rank, m1.rank, m2.rank, meta.seg.stride(0),
        y0.shape[1], y1.shape[1], y2.shape[1], tiles[0], tiles[0] + tiles[1],
        u.stride(0), u.stride(1), u.stride(2), b0.stride(0), b0.stride(1), b0.stride(2), b1.stride(0), b1.stride(1),
        b1.stride(2), b2.stride(0), b2.stride(1), b2.stride(2), y0.stride(0), y1.stride(0), y2.stride(0),
        SPLIT=split, BLOCK_M=bm, BLOCK_N=block_n, R=r_pad, IEEE=ieee,
    )


if HAS_TRITON:

    @triton.jit
    def _shrink_multi_kernel(
        x_ptr, a0_ptr, a1_ptr, a2_ptr, u_ptr, seg_ptr, r0_ptr, r1_ptr, r2_ptr, s0_ptr, s1_ptr, s2_ptr, seg_stride,
        fan_in, sx_t, sx_k, sa_s, sa_r, sa_k, su_m, su_s, su_t,
        K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        R: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_seg = tl.program_id(0)
        pid_m = tl.program_id(1)
        mod = tl.program_id(2) // SPLIT
        pid_k = tl.program_id(2) % SPLIT
        if mod == 0:
            a_ptr, rank_ptr, scale_ptr = a0_ptr, r0_ptr, s0_ptr
        elif mod == 1:
            a_ptr, rank_ptr, scale_ptr = a1_ptr, r1_ptr, s1_ptr
        else:
            a_ptr, rank_ptr, scale_ptr = a2_ptr, r2_ptr, s2_ptr
        length = tl.load(seg_ptr + seg_stride + pid_seg)
        rank = tl.load(rank_ptr + pid_seg)
        if (rank > 0) & (pid_m * BLOCK_M < length):
            start = tl.load(seg_ptr + pid_seg)
            slot = tl.load(seg_ptr + 2 * seg_stride + pid_seg).to(tl.int64)
            scale = tl.load(scale_ptr + pid_seg)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < length
            rows = (start + offs_m).to(tl.int64)
            offs_r = tl.arange(0, R)
            r_ok = offs_r < rank
            offs_k = tl.arange(0, BLOCK_K)
            x_base = x_ptr + rows[:, None] * sx_t
            a_base = a_ptr + slot * sa_s + offs_r[None, :] * sa_r
            acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
            for kk in range(0, K_PER_SPLIT, BLOCK_K):
                k = pid_k * K_PER_SPLIT + kk + offs_k
                k_ok = k < fan_in
                xt = tl.load(x_base + k[None, :] * sx_k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_base + k[:, None] * sa_k, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(xt, at)
            u_ptrs = u_ptr + mod * su_m + pid_k * su_s + rows[:, None] * su_t + offs_r[None, :]
            tl.store(u_ptrs, acc * scale, mask=row_ok[:, None])

    @triton.jit
    def _expand_multi_kernel(
        u_ptr, b0_ptr, b1_ptr, b2_ptr, y0_ptr, y1_ptr, y2_ptr, seg_ptr, r0_ptr, r1_ptr, r2_ptr, seg_stride,
        n0, n1, n2, t1, t2, su_m, su_s, su_t,
        sb0_s, sb0_n, sb0_r, sb1_s, sb1_n, sb1_r, sb2_s, sb2_n, sb2_r, sy0, sy1, sy2,
        SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_seg = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        if pid_n < t1:
            mod, tile, fan_out, b_ptr, y_ptr, rank_ptr = 0, pid_n, n0, b0_ptr, y0_ptr, r0_ptr
            sb_s, sb_n, sb_r, sy = sb0_s, sb0_n, sb0_r, sy0
        elif pid_n < t2:
            mod, tile, fan_out, b_ptr, y_ptr, rank_ptr = 1, pid_n - t1, n1, b1_ptr, y1_ptr, r1_ptr
            sb_s, sb_n, sb_r, sy = sb1_s, sb1_n, sb1_r, sy1
        else:
            mod, tile, fan_out, b_ptr, y_ptr, rank_ptr = 2, pid_n - t2, n2, b2_ptr, y2_ptr, r2_ptr
            sb_s, sb_n, sb_r, sy = sb2_s, sb2_n, sb2_r, sy2
        length = tl.load(seg_ptr + seg_stride + pid_seg)
        rank = tl.load(rank_ptr + pid_seg)
        if (rank > 0) & (pid_m * BLOCK_M < length):
            start = tl.load(seg_ptr + pid_seg)
            slot = tl.load(seg_ptr + 2 * seg_stride + pid_seg).to(tl.int64)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < length
            rows = (start + offs_m).to(tl.int64)
            offs_r = tl.arange(0, R)
            r_ok = offs_r < rank
            u_ptrs = u_ptr + mod * su_m + rows[:, None] * su_t + offs_r[None, :]
            u = tl.zeros((BLOCK_M, R), dtype=tl.float32)
            for s in tl.static_range(SPLIT):  # the deterministic split-K reduction
                u += tl.load(u_ptrs + s * su_s, mask=row_ok[:, None], other=0.0)
            u = u.to(b_ptr.dtype.element_ty)
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < fan_out
            bt = tl.load(b_ptr + slot * sb_s + offs_n[None, :] * sb_n + offs_r[:, None] * sb_r,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                delta = tl.dot(u.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
            else:
                delta = tl.dot(u, bt)
            y_ptrs = y_ptr + rows[:, None] * sy + offs_n[None, :]
            mask = row_ok[:, None] & n_ok[None, :]
            yt = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (yt.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)
