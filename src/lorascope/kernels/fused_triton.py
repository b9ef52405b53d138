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

Fixed shapes only, no host sync: all three can be captured in a CUDA graph. Inputs must be contiguous
in their last dimension. Under Triton's interpreter (TRITON_INTERPRET=1) they run on CPU tensors, which
is how the CPU tests check them (tests/kernels/test_fused_triton.py).
"""

from __future__ import annotations

import torch

from lorascope.kernels._triton import HAS_TRITON, tl, triton
from lorascope.kernels._triton import next_pow2 as _next_pow2


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual [T, H] float32 (updated in place when delta is given); delta [T, H] or None; returns
    the normalised rows [T, H] in weight's dtype."""
    t, h = residual.shape
    if residual.dtype != torch.float32 or residual.stride(1) != 1:
        raise ValueError(f"add_rmsnorm wants a float32 residual contiguous in its last dim, got {residual.dtype}")
    if delta is not None and (delta.shape != residual.shape or delta.stride(1) != 1):
        raise ValueError(f"add_rmsnorm: delta {tuple(delta.shape)} must match the residual {tuple(residual.shape)}")
    out = torch.empty((t, h), dtype=weight.dtype, device=residual.device)
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


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for [T, I] tensors of one dtype, rounded as torch rounds it."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError(f"silu_mul wants two [T, I] tensors of one dtype, got {tuple(gate.shape)} {tuple(up.shape)}")
    t, n = gate.shape
    out = torch.empty_like(gate)
    if t == 0:
        return out
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                                 BLOCK=block, BF16=gate.dtype == torch.bfloat16, num_warps=4)
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
    _rope_cache_kernel[(t, heads + kv_heads)](
        q, k, v, cos, sin, positions, slot_mapping, k_cache, v_cache,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), k_cache.stride(0), v_cache.stride(0),
        heads, HALF=half, BLOCK=_next_pow2(half), BF16=q.dtype == torch.bfloat16,
        num_warps=1 if half <= 64 else 2,
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
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, stride_out, BLOCK: tl.constexpr,
                         BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        dtype = out_ptr.dtype.element_ty
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        s = _round_to(g / (1.0 + tl.exp(-g)), dtype, BF16)
        tl.store(out_ptr + row * stride_out + cols, (s * u).to(dtype), mask=mask)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, kc_ptr, vc_ptr,
                           stride_q, stride_k, stride_v, stride_cs, stride_kc, stride_vc, heads,
                           HALF: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
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
            tl.store(vc_ptr + slot * stride_vc + g * (2 * HALF) + cols, vrow, mask=mask)
            tl.store(vc_ptr + slot * stride_vc + g * (2 * HALF) + HALF + cols, vrow2, mask=mask)
        x1 = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        # out = x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
        o1 = (_round_to(x1 * c1, dtype, BF16) + _round_to(-x2 * s1, dtype, BF16)).to(dtype)
        o2 = (_round_to(x2 * c2, dtype, BF16) + _round_to(x1 * s2, dtype, BF16)).to(dtype)
        tl.store(dst + cols, o1, mask=mask)
        tl.store(dst + HALF + cols, o2, mask=mask)
