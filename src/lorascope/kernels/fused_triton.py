"""Fused elementwise kernels for the GPU decoder: one launch where the torch layers take five to twenty.

A captured 8B decode step at batch 32 ran 1,834 kernels, about 57 per layer, and spent ~4 ms of its
8.4-9.1 ms outside the matmuls in small elementwise launches (benchmarks/RESULTS.md, the decode
profile). These three kernels replace them, computing exactly what the torch layers compute (same
roundings, in the same order), so the fused and unfused decoders agree to the last bit but for the
order of one float32 sum (the RMS):

- `add_rmsnorm(residual, delta, weight, eps)`: residual += delta (float32 residual stream, delta in the
  weights' dtype, as `DecoderLayer` adds branch outputs), then HF's RMSNorm of the new residual:
  `weight * (x * rsqrt(mean(x^2) + eps)).to(weight.dtype)`, the product rounded to the weights' dtype.
  Replaces the residual add, its cast, and the seven launches of `RMSNorm.forward`. delta=None: the norm
  alone (the first layer). One program per token row; the row (hidden <= 16384) is one tile.
- `silu_mul(gate, up)`: `F.silu(gate) * up` with torch's roundings (silu rounded to the dtype, then
  the product rounded). Grid (rows, column tiles).
- `rope_and_cache(q, k, v, cos, sin, positions, slot_mapping, k_cache, v_cache)`: rotary embedding of q
  (in place) and k (written straight into the cache at `slot_mapping`) with `Rotary.forward`'s
  roundings (cos/sin rounded to the dtype, each product rounded, then the sum), and v copied into
  its cache rows. Replaces ~16 launches of rotary and the two index_put writes of `paged_attention`.
  Grid (tokens, heads + kv heads): a program rotates one head of one token (both halves).

LoRA folded into them (`FusedLoRA`, for steps of up to a few hundred tokens; model/layers.py decides):
`add_rmsnorm_shrink` also computes, for each token, the shrink A_m[slot] @ h of the modules that read
the normalised row h (q/k/v, or gate/up), as float32 partial sums over S slices of the row (S programs a
token, so a step of few tokens still fills the GPU), and `rope_and_cache(..., lora=)` /
`silu_mul(..., lora=)` add the partials, scale them (u_m) and add B_m[slot] @ u_m to their inputs before
they use them (the expand), with the roundings of kernels/lora_triton.py (u rounded to the weights'
dtype, the delta added in float32 and the sum rounded): the grouped shrink and expand launches of those
modules disappear from the step. A token
finds its segment (start, length, slot) by one vector load of the step's segment table; tokens of no
segment (base requests) and rank rows past a slot's rank add nothing.

Fixed shapes only, no host sync: all three can be captured in a CUDA graph. Inputs must be contiguous
in their last dimension. Under Triton's interpreter (TRITON_INTERPRET=1) they run on CPU tensors, which
is how the CPU tests check them (tests/kernels/test_fused_triton.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorascope.kernels._triton import HAS_TRITON, tl, triton
from lorascope.kernels._triton import next_pow2 as _next_pow2

# The widest padded rank the fused LoRA path takes (its [rank, chunk] tiles live in registers).
FUSED_LORA_MAX_RANK = 64


@dataclass(frozen=True, slots=True)
class LoRAModule:
    """One module's LoRA operands for the fused kernels: A [S, R, in] (the shrink) or B [S, out, R] (the
    expand) of the slot store, and the step's per-segment rank and scale (kernels/lora_triton.py
    `LoRAModuleMeta`: `rank` int32 [n], `scale` float32 [n])."""

    a: torch.Tensor
    b: torch.Tensor
    rank: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True, slots=True)
class FusedLoRA:
    """The LoRA of a group of modules that read one normalised row (q/k/v, or gate/up), fused into the
    kernels around their GEMM. `modules` has one entry per member of the group (None: no LoRA weights
    there); `seg` is the step's int32 [3, n] segment table (start, length, slot), `u` the shrink's result
    [M, T, R] in the weights' dtype, M = the members with weights, in group order (set by
    `add_rmsnorm_shrink`)."""

    modules: tuple[LoRAModule | None, ...]
    seg: torch.Tensor
    u: torch.Tensor | None = None

    @property
    def present(self) -> list[LoRAModule]:
        return [m for m in self.modules if m is not None]

    @property
    def r_pad(self) -> int:
        return max(16, _next_pow2(self.present[0].a.shape[1]))

    def index(self, member: int) -> int:
        """The u plane of group member `member`, or -1 when it has no LoRA weights."""
        if self.modules[member] is None:
            return -1
        return sum(m is not None for m in self.modules[:member])

    def with_u(self, u: torch.Tensor) -> FusedLoRA:
        return FusedLoRA(self.modules, self.seg, u)


def fusable(lora: FusedLoRA) -> str | None:
    """Why the fused kernels cannot take `lora` (None: they can)."""
    present = lora.present
    if not present or len(present) > 3:
        return f"{len(present)} modules with LoRA weights (1..3 fuse)"
    a0 = present[0].a
    if any(m.a.shape[:2] != a0.shape[:2] or m.a.stride(2) != 1 or m.b.stride(2) != 1 for m in present):
        return "A/B of the group differ in slots or rank, or are not contiguous in their last dim"
    if max(16, _next_pow2(a0.shape[1])) > FUSED_LORA_MAX_RANK:
        return f"max rank {a0.shape[1]} above {FUSED_LORA_MAX_RANK}"
    if lora.seg.dim() != 2 or lora.seg.shape[0] != 3 or lora.seg.shape[1] == 0 or lora.seg.stride(1) != 1:
        return "no segment table"
    return None


def _lora_pointers(lora: FusedLoRA, members: int) -> tuple[list, list, list]:
    """Per group member (padded to 3): B, rank and scale tensors (the first present member's where a member
    has no LoRA weights: its constexpr plane index is -1, so they are never read)."""
    first = lora.present[0]
    mods = [(m or first) for m in [*lora.modules, *[None] * (3 - members)]]
    return [m.b for m in mods], [m.rank for m in mods], [m.scale for m in mods]


def shrink_splits(tokens: int, hidden: int) -> int:
    """How many programs share one token's shrink in `add_rmsnorm_shrink` (each takes hidden / splits of
    the row): enough that a step of few tokens still spreads its A reads over ~256 programs (one program
    a token left 100 of an H100's 132 SMs idle at batch 32 and read A at ~32 GB/s an SM: 8 us a layer)."""
    block = _next_pow2(hidden)
    want = _next_pow2(max(1, -(-256 // max(1, tokens))))
    return max(1, min(want, block // 256))


def add_rmsnorm_shrink(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       lora: FusedLoRA, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor, FusedLoRA]:
    """`add_rmsnorm` out of place, and the LoRA shrink of the modules that read its output h. Returns
    (the new residual, h, `lora` with u set). The new residual is `residual + delta` in a new tensor
    (`residual` itself when delta is None): the row is split over programs that each read all of it
    for the RMS, so none may write it in place. u [S, M, T, R] float32 holds the shrink's S partial
    sums over hidden / S columns, unscaled (zeros for tokens of no segment and rank rows past a slot's
    rank); the expand sums them, scales and rounds to the weights' dtype, as the grouped
    kernels round u (`shrunk_u`). `splits` (a power of two leaving >= 16 columns a program) defaults to
    `shrink_splits`."""
    if (why := fusable(lora)) is not None:
        raise ValueError(f"add_rmsnorm_shrink: {why}")
    t, h = residual.shape
    present = lora.present
    if present[0].a.shape[2] != h or present[0].a.dtype != weight.dtype:
        raise ValueError(f"add_rmsnorm_shrink: A {tuple(present[0].a.shape)} {present[0].a.dtype} does not read rows "
                         f"of {h} {weight.dtype}")
    out = _check_norm(residual, delta, weight)
    new_res = residual if delta is None else torch.empty_like(residual)
    r_pad = lora.r_pad
    block = _next_pow2(h)
    splits = shrink_splits(t, h) if splits is None else splits
    if splits < 1 or splits & (splits - 1) or block // splits < 16:
        raise ValueError(f"add_rmsnorm_shrink: splits {splits} must be a power of two leaving >= 16 of the row's "
                         f"{block} (padded) columns to each program")
    u = torch.empty((splits, len(present), t, r_pad), dtype=torch.float32, device=residual.device)
    if t == 0:
        return new_res, out, lora.with_u(u)
    # the kernel's modules 0..M-1 are the present members in group order (u's planes); unused slots repeat
    # the first (never read)
    pad = [*present, *[present[0]] * (3 - len(present))]
    a, rank = [m.a for m in pad], [m.rank for m in pad]
    chunk = block // splits
    sub = max(16, min(chunk, 2048 // r_pad))
    seg = lora.seg
    _add_rmsnorm_shrink_kernel[(t, splits)](
        residual, residual if delta is None else delta, new_res, weight, out, h, eps,
        residual.stride(0), 0 if delta is None else delta.stride(0), new_res.stride(0), out.stride(0),
        a[0], a[1], a[2], u, seg, rank[0], rank[1], rank[2],
        seg.stride(0), seg.shape[1], a[0].stride(0), a[0].stride(1), u.stride(0), u.stride(1), u.stride(2),
        HAS_DELTA=delta is not None, BLOCK=block, BF16=weight.dtype == torch.bfloat16,
        LORA_M=len(present), R=r_pad, CHUNK=chunk, SUB=sub, SEG_PAD=_next_pow2(seg.shape[1]),
        num_warps=4,
    )
    return new_res, out, lora.with_u(u)


def shrunk_u(lora: FusedLoRA, plane: int, dtype: torch.dtype) -> torch.Tensor:
    """u plane `plane` as the expand uses it: the partial sums added (the kernels' order of that float32
    sum may differ), times each token's segment scale, rounded to `dtype` ([T, R]; for tests and
    inspection)."""
    if lora.u is None:
        raise ValueError("shrunk_u: no u (run add_rmsnorm_shrink first)")
    part = lora.u[:, plane]
    total = part[0].clone()
    for s in range(1, part.shape[0]):
        total += part[s]
    seg = lora.seg.cpu()
    present = lora.present[plane]
    scale = torch.zeros(total.shape[0], dtype=torch.float32)
    for i in range(seg.shape[1]):
        start, length = int(seg[0, i]), int(seg[1, i])
        scale[start:start + length] = float(present.scale[i])
    return (total * scale.to(total.device)[:, None]).to(dtype)


def _check_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    t, h = residual.shape
    if residual.dtype != torch.float32 or residual.stride(1) != 1:
        raise ValueError(f"add_rmsnorm wants a float32 residual contiguous in its last dim, got {residual.dtype}")
    if delta is not None and (delta.shape != residual.shape or delta.stride(1) != 1):
        raise ValueError(f"add_rmsnorm: delta {tuple(delta.shape)} must match the residual {tuple(residual.shape)}")
    return torch.empty((t, h), dtype=weight.dtype, device=residual.device)


def _lora_launch_args(lora: FusedLoRA | None, members: int, ref: torch.Tensor) -> tuple[list, dict]:
    """The expand's pointer/stride arguments and constexprs for a fused kernel (dummies without LoRA)."""
    if lora is None:
        dummy = [ref] * 11 + [0] * 9
        return dummy, {"LORA": False, "U0": -1, "U1": -1, "U2": -1, "R": 16, "SEG_PAD": 1, "SPLITS": 1}
    if (why := fusable(lora)) is not None or lora.u is None:
        raise ValueError(f"fused LoRA expand: {why or 'no u (run add_rmsnorm_shrink first)'}")
    if len(lora.modules) != members:
        raise ValueError(f"fused LoRA expand: this kernel adds {members} modules' deltas (q/k/v: 3, gate/up: 2), "
                         f"got a group of {len(lora.modules)}")
    b, rank, scale = _lora_pointers(lora, members)
    seg, u = lora.seg, lora.u
    if u.dim() != 4 or u.dtype != torch.float32 or u.shape[1] != len(lora.present) or u.shape[3] != lora.r_pad:
        raise ValueError(f"fused LoRA expand: u {tuple(u.shape)} {u.dtype} is not add_rmsnorm_shrink's "
                         f"[splits, {len(lora.present)}, T, {lora.r_pad}] float32 partial sums")
    idx = [lora.index(i) if i < members else -1 for i in range(3)]
    args = [u, b[0], b[1], b[2], rank[0], rank[1], rank[2], scale[0], scale[1], scale[2], seg, seg.stride(0),
            seg.shape[1], u.stride(0), u.stride(1), u.stride(2), b[0].stride(0), b[1].stride(0), b[2].stride(0),
            b[0].stride(1)]
    return args, {"LORA": True, "U0": idx[0], "U1": idx[1], "U2": idx[2], "R": lora.r_pad,
                  "SEG_PAD": _next_pow2(seg.shape[1]), "SPLITS": u.shape[0]}


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual [T, H] float32 (updated in place when delta is given); delta [T, H] or None; returns
    the normalised rows [T, H] in weight's dtype."""
    t, h = residual.shape
    out = _check_norm(residual, delta, weight)
    if t == 0:
        return out
    block = _next_pow2(h)
    _add_rmsnorm_kernel[(t,)](
        residual, residual if delta is None else delta, weight, out, h, eps,
        residual.stride(0), 0 if delta is None else delta.stride(0), out.stride(0),
        HAS_DELTA=delta is not None, BLOCK=block, BF16=weight.dtype == torch.bfloat16,
        num_warps=min(16, max(4, block // 512)),
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor, lora: FusedLoRA | None = None) -> torch.Tensor:
    """F.silu(gate) * up for [T, I] tensors of one dtype, rounded as torch rounds it. With `lora` (the
    gate/up group, u from `add_rmsnorm_shrink`), gate and up first get their LoRA deltas, rounded as
    the grouped expand rounds them."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError(f"silu_mul wants two [T, I] tensors of one dtype, got {tuple(gate.shape)} {tuple(up.shape)}")
    t, n = gate.shape
    out = torch.empty_like(gate)
    if t == 0:
        return out
    lora_args, lora_consts = _lora_launch_args(lora, 2, gate)
    block = 1024 if lora is None else max(64, 4096 // lora_consts["R"])
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                                 *lora_args, BLOCK=block, BF16=gate.dtype == torch.bfloat16,
                                                 **lora_consts, num_warps=4)
    return out


def rope_and_cache(
    q: torch.Tensor,  # [T, H, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [max_len, D] float32
    sin: torch.Tensor,  # [max_len, D] float32
    positions: torch.Tensor,  # [T] int
    slot_mapping: torch.Tensor,  # [T] int: the cache row of each token
    k_cache: torch.Tensor,  # [rows, Hkv, D]
    v_cache: torch.Tensor,  # [rows, Hkv, D]
    lora: FusedLoRA | None = None,  # the q/k/v group: their LoRA deltas are added first
) -> None:
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if d % 2 or k.shape[2] != d or v.shape != k.shape or k_cache.shape[1:] != (kv_heads, d):
        raise ValueError(f"rope_and_cache: shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"cache {tuple(k_cache.shape)} do not fit together")
    if q.dtype != k_cache.dtype or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"rope_and_cache: q, k, v and the cache must share a dtype ({q.dtype}, {k_cache.dtype})")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError(f"rope_and_cache: {name} must have contiguous heads of head_dim {d}")
    if t == 0:
        return
    half = d // 2
    lora_args, lora_consts = _lora_launch_args(lora, 3, q)
    _rope_cache_kernel[(t, heads + kv_heads)](
        q, k, v, cos, sin, positions, slot_mapping, k_cache, v_cache,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), k_cache.stride(0), v_cache.stride(0),
        heads, *lora_args, HALF=half, BLOCK=_next_pow2(half), BF16=q.dtype == torch.bfloat16, **lora_consts,
        num_warps=(1 if half <= 64 else 2) if lora is None else 4,
    )


if HAS_TRITON:

    @triton.jit
    def _round_to(x, dtype: tl.constexpr, BF16: tl.constexpr):
        """float32 x rounded to `dtype` (ties to even), returned as float32. bfloat16 with integer ops:
        written `x.to(bf16).to(f32)`, the round trip was dropped on the H200 (products then fused into
        the following add, 1 ulp off torch in ~12% of rotary's elements); the interpreter truncates."""
        if BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)

    @triton.jit
    def _segment_of(tok, seg_ptr, seg_stride, num_seg, SEG_PAD: tl.constexpr):
        """(index, found) of the segment (start, length, slot) holding token `tok`: one vector load."""
        idx = tl.arange(0, SEG_PAD)
        ok = idx < num_seg
        start = tl.load(seg_ptr + idx, mask=ok, other=0)
        length = tl.load(seg_ptr + seg_stride + idx, mask=ok, other=0)
        hit = ok & (start <= tok) & (tok < start + length)
        return tl.sum(tl.where(hit, idx, 0), axis=0), tl.sum(hit.to(tl.int32), axis=0) > 0

    @triton.jit
    def _shrink_row(acc, a_ptr, slot, rank, x, k, k_ok, sa_s, sa_r, R: tl.constexpr):
        """acc [R, CHUNK] += A[slot, :rank, k] * x[k] (float32; rows past the rank read as zero)."""
        offs_r = tl.arange(0, R)
        a = tl.load(a_ptr + slot * sa_s + offs_r[:, None] * sa_r + k[None, :],
                    mask=(offs_r < rank)[:, None] & k_ok[None, :], other=0.0)
        return acc + a.to(tl.float32) * x[None, :]

    @triton.jit
    def _load_u(u_ptr, su_s, scale, rank, dtype: tl.constexpr, R: tl.constexpr, SPLITS: tl.constexpr):
        """u [R] float32: the shrink's SPLITS partial sums (one [SPLITS, R] load) added, times the segment's
        scale, rounded to the weights' dtype as the grouped shrink stores u (`.to`, which Triton's
        interpreter truncates, like theirs); rows past the rank are zero."""
        offs_r = tl.arange(0, R)
        if SPLITS == 1:
            u = tl.load(u_ptr + offs_r, mask=offs_r < rank, other=0.0)
        else:
            offs_s = tl.arange(0, SPLITS)
            part = tl.load(u_ptr + offs_s[:, None] * su_s + offs_r[None, :], mask=(offs_r < rank)[None, :], other=0.0)
            u = tl.sum(part, axis=0)
        return (u * scale).to(dtype).to(tl.float32)

    @triton.jit
    def _expand_cols(u, b_ptr, slot, rank, cols, col_ok, sb_s, sb_n, R: tl.constexpr):
        """B[slot, cols, :rank] @ u[:rank] in float32 (u from `_load_u`)."""
        offs_r = tl.arange(0, R)
        b = tl.load(b_ptr + slot * sb_s + cols[:, None] * sb_n + offs_r[None, :],
                    mask=col_ok[:, None] & (offs_r < rank)[None, :], other=0.0)
        return tl.sum(b.to(tl.float32) * u[None, :], axis=1)

    @triton.jit
    def _add_rmsnorm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, n, eps, stride_res, stride_delta, stride_out,
                            HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x = x + tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(res_ptr + row * stride_res + cols, x, mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        dtype = out_ptr.dtype.element_ty
        normed = _round_to(x * rstd, dtype, BF16)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (w * normed).to(dtype), mask=mask)

    @triton.jit
    def _add_rmsnorm_shrink_kernel(res_ptr, delta_ptr, new_res_ptr, w_ptr, out_ptr, n, eps, stride_res, stride_delta,
                                   stride_new, stride_out, a0_ptr, a1_ptr, a2_ptr, u_ptr, seg_ptr, r0_ptr, r1_ptr,
                                   r2_ptr, seg_stride, num_seg, sa_s, sa_r, su_s, su_m, su_t,
                                   HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr,
                                   LORA_M: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                                   SEG_PAD: tl.constexpr):
        """Program (row, split): the row's RMS from all of it, then columns [split * CHUNK, +CHUNK): the new
        residual and h there, and the shrink's partial sum over them, u[split, m, row] = A_m[slot, :, cols] @ h."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x = x + tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        dtype = out_ptr.dtype.element_ty
        s, found = _segment_of(row, seg_ptr, seg_stride, num_seg, SEG_PAD)
        slot = tl.load(seg_ptr + 2 * seg_stride + s).to(tl.int64)
        rank0 = tl.where(found, tl.load(r0_ptr + s), 0)
        rank1 = tl.where(found, tl.load(r1_ptr + s), 0)
        rank2 = tl.where(found, tl.load(r2_ptr + s), 0)
        acc0 = tl.zeros((R, SUB), dtype=tl.float32)
        acc1 = tl.zeros((R, SUB), dtype=tl.float32)
        acc2 = tl.zeros((R, SUB), dtype=tl.float32)
        for c in tl.static_range(0, CHUNK, SUB):  # unrolled: every sub-chunk's loads can be in flight
            k = split * CHUNK + c + tl.arange(0, SUB)
            k_ok = k < n
            # the same float32 values as x[k] above (the same loads and add)
            xk = tl.load(res_ptr + row * stride_res + k, mask=k_ok, other=0.0).to(tl.float32)
            if HAS_DELTA:
                xk = xk + tl.load(delta_ptr + row * stride_delta + k, mask=k_ok, other=0.0).to(tl.float32)
                tl.store(new_res_ptr + row * stride_new + k, xk, mask=k_ok)
            wk = tl.load(w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            hk = (wk * _round_to(xk * rstd, dtype, BF16)).to(dtype)
            tl.store(out_ptr + row * stride_out + k, hk, mask=k_ok)
            hf = hk.to(tl.float32)
            acc0 = _shrink_row(acc0, a0_ptr, slot, rank0, hf, k, k_ok, sa_s, sa_r, R)
            if LORA_M > 1:
                acc1 = _shrink_row(acc1, a1_ptr, slot, rank1, hf, k, k_ok, sa_s, sa_r, R)
            if LORA_M > 2:
                acc2 = _shrink_row(acc2, a2_ptr, slot, rank2, hf, k, k_ok, sa_s, sa_r, R)
        u_row = u_ptr + split * su_s + row * su_t + tl.arange(0, R)
        tl.store(u_row, tl.sum(acc0, axis=1))
        if LORA_M > 1:
            tl.store(u_row + su_m, tl.sum(acc1, axis=1))
        if LORA_M > 2:
            tl.store(u_row + 2 * su_m, tl.sum(acc2, axis=1))

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, stride_out,
                         lu_ptr, b0_ptr, b1_ptr, b2_ptr, r0_ptr, r1_ptr, r2_ptr, sc0_ptr, sc1_ptr, sc2_ptr, seg_ptr,
                         seg_stride, num_seg, su_s, su_m, su_t, sb0_s, sb1_s, sb2_s, sb_n,
                         BLOCK: tl.constexpr, BF16: tl.constexpr, LORA: tl.constexpr, U0: tl.constexpr,
                         U1: tl.constexpr, U2: tl.constexpr, R: tl.constexpr, SEG_PAD: tl.constexpr,
                         SPLITS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        dtype = out_ptr.dtype.element_ty
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        if LORA:  # gate (member 0) and up (member 1) get their deltas, rounded as the grouped expand's y
            sidx, found = _segment_of(row, seg_ptr, seg_stride, num_seg, SEG_PAD)
            slot = tl.load(seg_ptr + 2 * seg_stride + sidx).to(tl.int64)
            if U0 >= 0:
                rank = tl.where(found, tl.load(r0_ptr + sidx), 0)
                lu = _load_u(lu_ptr + U0 * su_m + row * su_t, su_s, tl.load(sc0_ptr + sidx), rank, dtype, R, SPLITS)
                d = _expand_cols(lu, b0_ptr, slot, rank, cols, mask, sb0_s, sb_n, R)
                g = _round_to(g + d, dtype, BF16)
            if U1 >= 0:
                rank = tl.where(found, tl.load(r1_ptr + sidx), 0)
                lu = _load_u(lu_ptr + U1 * su_m + row * su_t, su_s, tl.load(sc1_ptr + sidx), rank, dtype, R, SPLITS)
                d = _expand_cols(lu, b1_ptr, slot, rank, cols, mask, sb1_s, sb_n, R)
                u = _round_to(u + d, dtype, BF16)
        s = _round_to(g / (1.0 + tl.exp(-g)), dtype, BF16)
        tl.store(out_ptr + row * stride_out + cols, (s * u).to(dtype), mask=mask)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, kc_ptr, vc_ptr,
                           stride_q, stride_k, stride_v, stride_cs, stride_kc, stride_vc, heads,
                           lu_ptr, b0_ptr, b1_ptr, b2_ptr, r0_ptr, r1_ptr, r2_ptr, sc0_ptr, sc1_ptr, sc2_ptr,
                           seg_ptr, seg_stride, num_seg, su_s, su_m, su_t, sb0_s, sb1_s, sb2_s, sb_n,
                           HALF: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr, LORA: tl.constexpr,
                           U0: tl.constexpr, U1: tl.constexpr, U2: tl.constexpr, R: tl.constexpr,
                           SEG_PAD: tl.constexpr, SPLITS: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < HALF
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        dtype = q_ptr.dtype.element_ty
        # cos/sin rounded to the dtype first, as Rotary.forward's `.to(x.dtype)`
        c1 = _round_to(tl.load(cos_ptr + pos * stride_cs + cols, mask=mask, other=0.0), dtype, BF16)
        c2 = _round_to(tl.load(cos_ptr + pos * stride_cs + HALF + cols, mask=mask, other=0.0), dtype, BF16)
        s1 = _round_to(tl.load(sin_ptr + pos * stride_cs + cols, mask=mask, other=0.0), dtype, BF16)
        s2 = _round_to(tl.load(sin_ptr + pos * stride_cs + HALF + cols, mask=mask, other=0.0), dtype, BF16)
        if LORA:
            sidx, found = _segment_of(tok, seg_ptr, seg_stride, num_seg, SEG_PAD)
            lslot = tl.load(seg_ptr + 2 * seg_stride + sidx).to(tl.int64)
        if head < heads:
            src = q_ptr + tok * stride_q + head * (2 * HALF)
            dst = src
        else:
            g = head - heads
            src = k_ptr + tok * stride_k + g * (2 * HALF)
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            dst = kc_ptr + slot * stride_kc + g * (2 * HALF)
            vrow = tl.load(v_ptr + tok * stride_v + g * (2 * HALF) + cols, mask=mask)
            vrow2 = tl.load(v_ptr + tok * stride_v + g * (2 * HALF) + HALF + cols, mask=mask)
            if LORA and U2 >= 0:  # v's delta, rounded as the grouped expand rounds y (both constexpr)
                rank = tl.where(found, tl.load(r2_ptr + sidx), 0)
                u_row = lu_ptr + U2 * su_m + tok * su_t
                c0 = g * (2 * HALF) + cols
                lu = _load_u(u_row, su_s, tl.load(sc2_ptr + sidx), rank, dtype, R, SPLITS)
                d1 = _expand_cols(lu, b2_ptr, lslot, rank, c0, mask, sb2_s, sb_n, R)
                d2 = _expand_cols(lu, b2_ptr, lslot, rank, c0 + HALF, mask, sb2_s, sb_n, R)
                vrow = _round_to(vrow.to(tl.float32) + d1, dtype, BF16).to(dtype)
                vrow2 = _round_to(vrow2.to(tl.float32) + d2, dtype, BF16).to(dtype)
            tl.store(vc_ptr + slot * stride_vc + g * (2 * HALF) + cols, vrow, mask=mask)
            tl.store(vc_ptr + slot * stride_vc + g * (2 * HALF) + HALF + cols, vrow2, mask=mask)
        x1 = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        if LORA:  # q's (member 0) or k's (member 1) delta before the rotation
            if head < heads:
                if U0 >= 0:
                    rank = tl.where(found, tl.load(r0_ptr + sidx), 0)
                    u_row = lu_ptr + U0 * su_m + tok * su_t
                    c0 = head * (2 * HALF) + cols
                    lu = _load_u(u_row, su_s, tl.load(sc0_ptr + sidx), rank, dtype, R, SPLITS)
                    d1 = _expand_cols(lu, b0_ptr, lslot, rank, c0, mask, sb0_s, sb_n, R)
                    d2 = _expand_cols(lu, b0_ptr, lslot, rank, c0 + HALF, mask, sb0_s, sb_n, R)
                    x1 = _round_to(x1 + d1, dtype, BF16)
                    x2 = _round_to(x2 + d2, dtype, BF16)
            else:
                if U1 >= 0:
                    rank = tl.where(found, tl.load(r1_ptr + sidx), 0)
                    u_row = lu_ptr + U1 * su_m + tok * su_t
                    c0 = (head - heads) * (2 * HALF) + cols
                    lu = _load_u(u_row, su_s, tl.load(sc1_ptr + sidx), rank, dtype, R, SPLITS)
                    d1 = _expand_cols(lu, b1_ptr, lslot, rank, c0, mask, sb1_s, sb_n, R)
                    d2 = _expand_cols(lu, b1_ptr, lslot, rank, c0 + HALF, mask, sb1_s, sb_n, R)
                    x1 = _round_to(x1 + d1, dtype, BF16)
                    x2 = _round_to(x2 + d2, dtype, BF16)
        # out = x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
        o1 = (_round_to(x1 * c1, dtype, BF16) + _round_to(-x2 * s1, dtype, BF16)).to(dtype)
        o2 = (_round_to(x2 * c2, dtype, BF16) + _round_to(x1 * s2, dtype, BF16)).to(dtype)
        tl.store(dst + cols, o1, mask=mask)
        tl.store(dst + HALF + cols, o2, mask=mask)
