"""A skinny GEMM for decode-sized steps: y = x @ W^T (+ bias) for few tokens, one Triton launch.

A decode step at batch 32 is bound by reading the weights: on the H200 cuBLASLt moves the four packed
GEMMs of a llama-3.1-8b layer at 2.6-3.9 TB/s (benchmarks/RESULTS.md, 2026-11-29: o_proj 11.2 us for
34 MB, qkv 15.2 us for 50 MB), below the ~4.3 TB/s a streaming read reaches. The small GEMMs lose the
most: 4,096 outputs cut into tiles leave too few programs to keep enough loads in flight. This kernel
cuts the reduction dimension too (split-K), so any shape gets ~2 programs per SM, and reduces the
splits inside the same launch, without a second kernel or an atomic float add:

    grid (cdiv(N, BLOCK_N), SPLIT_K): program (n, k) computes the [M, BLOCK_N] tile of outputs n over
    the K range [k * K_PER_SPLIT, (k + 1) * K_PER_SPLIT) in float32 (W tiles [BLOCK_N, BLOCK_K] read
    once, x tiles re-read from L2); with SPLIT_K > 1 it stores that partial in a float32 workspace
    [SPLIT_K, M, N] and increments the tile's counter (acquire-release); the program that finds the
    counter at SPLIT_K - 1 (the last of the tile) sums the SPLIT_K partials in split order (so the sum
    does not depend on which program came last), adds the bias, rounds to y's dtype, stores y and
    resets the counter to 0 for the next launch.

`SWAP` puts the weight tile on the dot's M side ([BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]), the layout
that Hopper's tensor cores want when the tokens are few (a 64-row operand); otherwise x is the M side.
The result is the same up to float32 summation order within a tile.

The counters are one int32 per output tile, kept per device and stream (`_counters`) and zero between
launches, so the kernel has fixed shapes, no host sync and no per-call memset: it can be captured in a
CUDA graph. Two launches that share counters must not run at the same time, which holds for launches on
one stream; each stream gets its own counters.

Inputs: x [M, K] and W [N, K] (torch's Linear layout) of one dtype (bfloat16, float16 or float32),
contiguous in K; bias [N] or None; M <= 128 (`MAX_TOKENS`: larger steps are compute-bound and belong to
cuBLAS). float32 uses IEEE dots. Under Triton's interpreter half-precision dots go up to float32 (see
lora_triton.py), which is how the CPU tests check the kernel (tests/kernels/test_gemm_triton.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorascope.kernels._triton import HAS_TRITON, tl, triton
from lorascope.kernels._triton import INTERPRETED as _INTERPRETED
from lorascope.kernels._triton import NUM_SMS as _NUM_SMS
from lorascope.kernels._triton import next_pow2 as _next_pow2

MAX_TOKENS = 128
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class GemmConfig:
    """One launch configuration; `default_config` picks one from the shape."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    swap: bool = True
    num_warps: int = 4
    num_stages: int = 4


def default_config(m: int, n: int, k: int, block_n: int = 64) -> GemmConfig:
    """Tiles of `block_n` outputs, K tiles of 128, and the smallest power-of-two split that gives at
    least two programs per SM (at most 16 splits, each at least 512 deep)."""
    tiles = _cdiv(n, block_n)
    split = 1
    while tiles * split < 2 * _NUM_SMS and split < 16 and k // (2 * split) >= 512:
        split *= 2
    return GemmConfig(block_n=block_n, block_k=128, split_k=split)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 zeros for `device`'s current stream, grown (never shrunk) on demand. The kernel leaves
    them at zero, so one buffer serves every launch on the stream."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M <= MAX_TOKENS, K]; returns y [M, N] of x's dtype (into `out`
    when given: [M, N], contiguous)."""
    if not HAS_TRITON:
        raise RuntimeError("skinny_linear needs triton (pip install triton); use F.linear without it")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not form x @ weight^T")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype} must share one of {_DTYPES}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous in their last dimension (K)")
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"skinny_linear takes 1..{MAX_TOKENS} tokens, got {m}: use F.linear for more")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] of {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    cfg = config or default_config(m, n, k)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor")
    block_m = max(16, _next_pow2(m))
    k_per_split = _cdiv(_cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k  # a multiple of BLOCK_K
    split = _cdiv(k, k_per_split)  # splits that hold work
    tiles = _cdiv(n, cfg.block_n)
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        counters = _counters(x.device, tiles)
    else:
        ws, counters = out, out  # never touched
    ieee = x.dtype == torch.float32 or _INTERPRETED
    _skinny_gemm_kernel[(tiles, split)](
        x, weight, bias if bias is not None else out, out, ws, counters, m, n, k, x.stride(0), weight.stride(0),
        K_PER_SPLIT=k_per_split, SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SWAP=cfg.swap, HAS_BIAS=bias is not None, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


if HAS_TRITON:

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, sx_m, sw_n,
        K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        k0 = pid_k * K_PER_SPLIT
        x_base = x_ptr + offs_m.to(tl.int64) * sx_m
        w_base = w_ptr + offs_n.to(tl.int64) * sw_n
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, K_PER_SPLIT, BLOCK_K):
            k = k0 + kk + offs_k
            k_ok = k < K
            wt = tl.load(w_base[:, None] + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if SWAP:
                xt = tl.load(x_base[None, :] + k[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(wt.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(wt, xt)
            else:
                xt = tl.load(x_base[:, None] + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(xt, tl.trans(wt))
        if SWAP:
            res = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        else:
            res = acc
        mask = m_ok[:, None] & n_ok[None, :]
        tile = offs_m[:, None] * N + offs_n[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                res += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + tile, res.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            mn = M * N
            tl.store(ws_ptr + pid_k * mn + tile, res, mask=mask)
            # every thread's share of the partial is stored before the count goes up (the barrier), and
            # the count's release / acquire orders it for the program that comes last
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if done == SPLIT_K - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):  # split order: deterministic
                    total += tl.load(ws_ptr + s * mn + tile, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + tile, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
