"""The split-K skinny GEMM (kernels/gemm_triton.py) computes F.linear.

On a CUDA device the kernel tests run there; without one, `test_kernels_under_triton_interpreter` runs
this file again with TRITON_INTERPRET=1 on CPU tensors (the interpreter truncates float32 -> bfloat16
instead of rounding, so bf16 outputs may sit one ulp below torch's there).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from _kernel_marks import kernel_test, run_file_under_interpreter
from lorascope.kernels.gemm_triton import HAS_TRITON, MAX_TOKENS, GemmConfig, default_config, skinny_linear

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"

CONFIGS = [
    GemmConfig(block_n=32, block_k=64, split_k=1),
    GemmConfig(block_n=32, block_k=64, split_k=3, swap=False),
    GemmConfig(block_n=64, block_k=32, split_k=8),  # splits past the K that holds work are dropped
    None,  # default_config
]


def _operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, w, b


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 128), (5, 100, 300), (32, 96, 520), (40, 33, 1000)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["tile", "split3-x-side", "split8", "default"])
def test_kernel_matches_linear(dtype: torch.dtype, shape: tuple[int, int, int], cfg: GemmConfig | None) -> None:
    m, n, k = shape
    x, w, b = _operands(m, n, k, dtype, bias=m % 2 == 1, seed=m * n)
    got = skinny_linear(x, w, b, config=cfg)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (m, n) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # one rounding of a float32 sum: within a bf16 ulp (two under the interpreter's truncation)
        torch.testing.assert_close(got.double(), want, rtol=2 ** -7 if not INTERPRETED else 2 ** -6, atol=1e-2)
    # the split-K reduction sums in split order: the same bits every launch, and the counters are reset
    for _ in range(2):
        assert torch.equal(skinny_linear(x, w, b, config=cfg), got)


@kernel_test
def test_kernel_writes_into_out_and_leaves_other_buffers_alone() -> None:
    x, w, b = _operands(7, 80, 256, torch.float32, bias=True, seed=3)
    out = torch.full((7, 80), float("nan"), device=DEVICE)
    got = skinny_linear(x, w, b, config=GemmConfig(block_n=32, block_k=64, split_k=4), out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_default_config_fills_the_gpu_and_bad_input_is_named() -> None:
    cfg = default_config(32, 4096, 4096)  # o_proj: 64 tiles, so it splits K
    assert cfg.split_k * -(-4096 // cfg.block_n) >= 2 * 132 and 4096 // cfg.split_k >= 256
    assert default_config(32, 28672, 4096).split_k == 1  # gate_up: 448 tiles already
    x, w, _ = _operands(3, 16, 32, torch.float32, bias=False, seed=1)
    with pytest.raises(ValueError, match="do not form"):
        skinny_linear(x, w[:, :16])
    with pytest.raises(ValueError, match="share one of"):
        skinny_linear(x, w.double())
    with pytest.raises(ValueError, match=f"1..{MAX_TOKENS} tokens"):
        skinny_linear(torch.zeros(MAX_TOKENS + 1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="contiguous"):
        skinny_linear(torch.zeros(32, 3, device=DEVICE).t(), torch.zeros(16, 32, device=DEVICE).t().contiguous().t())


@pytest.mark.skipif(HAS_CUDA or INTERPRETED or not HAS_TRITON, reason="the kernels run natively on CUDA")
def test_kernels_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__)
