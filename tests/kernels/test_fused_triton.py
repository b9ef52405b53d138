"""The fused GPU kernels (kernels/fused_triton.py) compute what the torch layers compute.

On a CUDA device the kernel tests run there; without one, `test_kernels_under_triton_interpreter` runs
this file again in a subprocess with TRITON_INTERPRET=1 (set before triton is imported), on CPU
tensors. The interpreter truncates float32 -> bfloat16 instead of rounding (lora_triton.py), so bf16
results are compared almost exactly on CUDA and within a few bf16 ulps under the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _kernel_marks import kernel_test
from lorascope.kernels.fused_triton import HAS_TRITON, add_rmsnorm, rope_and_cache, silu_mul
from lorascope.model.config import ModelConfig
from lorascope.model.layers import RMSNorm, Rotary

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"

DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-6, atol=2e-6)
    elif INTERPRETED:  # truncation instead of rounding, up to three times: a few ulps (2^-7 relative each)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -5, atol=2 ** -6)
    else:  # the same roundings in the same order; only the RMS sum's order differs
        diff = got != want
        mismatch = diff.float().mean().item()
        where = diff.nonzero()[:5].tolist()
        assert mismatch < 0.01, (f"{mismatch:.2%} of elements differ from torch's, e.g. at {where}: "
                                 f"{got[diff][:5].tolist()} vs {want[diff][:5].tolist()}")
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 4096])
@pytest.mark.parametrize("with_delta", [True, False])
def test_kernel_add_rmsnorm_matches_the_layers(dtype: torch.dtype, hidden: int, with_delta: bool) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen).to(DEVICE)
    delta = (torch.randn(7, hidden, generator=gen) * 3).to(dtype).to(DEVICE) if with_delta else None
    norm = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen).to(DEVICE))
        want_res = x + delta.float() if delta is not None else x.clone()
        want = norm(want_res)
        res = x.clone()
        got = add_rmsnorm(res, delta, norm.weight, norm.eps)
    assert got.dtype == dtype
    torch.testing.assert_close(res, want_res, rtol=0, atol=0)  # the residual add is exact float32
    _close(got, want, dtype)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    gate = (torch.randn(5, 1500, generator=gen) * 4).to(dtype).to(DEVICE)
    up = torch.randn(5, 1500, generator=gen).to(dtype).to(DEVICE)
    _close(silu_mul(gate, up), F.silu(gate) * up, dtype)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (8, 8, 64), (6, 2, 32)])
def test_kernel_rope_and_cache_matches_rotary_and_the_cache_write(dtype, heads, kv_heads, head_dim) -> None:
    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=heads * head_dim, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=64)
    rotary = Rotary(cfg, 64)
    rotary.materialize(torch.device(DEVICE))
    gen = torch.Generator().manual_seed(heads)
    t, rows = 9, 40
    q = torch.randn(t, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(t, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(t, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 3, 17, 40, 63, 5, 9], device=DEVICE)
    slots = torch.randperm(rows, generator=gen)[:t].to(DEVICE)
    k_cache = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    want_q, want_k = rotary(q, positions), rotary(k, positions)
    got_q = q.clone()
    rope_and_cache(got_q, k, v, rotary.cos, rotary.sin, positions, slots, k_cache, v_cache)
    _close(got_q, want_q, dtype)
    _close(k_cache[slots], want_k, dtype)
    assert torch.equal(v_cache[slots], v)
    untouched = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all(), "wrote rows outside slot_mapping"


@kernel_test
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_kernel_fused_decoder_equals_the_torch_decoder(preset: str) -> None:
    """A whole forward pass (prefill then decode, with LoRA off) through both paths: float32, so the
    logits agree to float32 rounding and the greedy tokens are the same."""
    from lorascope.kernels.attention import AttentionMetadata
    from lorascope.model.context import StepContext
    from lorascope.model.weights import load_model

    model = load_model(preset, "float32", DEVICE, max_len=64).model
    cfg = model.cfg
    rows = 4 * 16
    caches = {f: [(torch.zeros(rows, cfg.num_key_value_heads, cfg.head_dim, device=DEVICE),
                   torch.zeros(rows, cfg.num_key_value_heads, cfg.head_dim, device=DEVICE))
                  for _ in range(cfg.num_hidden_layers)] for f in (False, True)}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (11,), generator=gen).tolist()
    table = [2, 0, 3]
    outs = {}
    for fused in (False, True):
        model.fused = fused
        with torch.inference_mode():
            attn = AttentionMetadata.build([11], [11], [table], 16, cfg.sliding_window, torch.device(DEVICE))
            hidden = model(torch.tensor(prompt, device=DEVICE), torch.arange(11, device=DEVICE),
                           StepContext(attn, caches[fused]))
            first = model.compute_logits(hidden[-1:])
            nxt = int(first.argmax())
            attn = AttentionMetadata.build([1], [12], [table], 16, cfg.sliding_window, torch.device(DEVICE))
            hidden = model(torch.tensor([nxt], device=DEVICE), torch.tensor([11], device=DEVICE),
                           StepContext(attn, caches[fused]))
            outs[fused] = (first, model.compute_logits(hidden))
    model.fused = False
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert int(a.argmax()) == int(b.argmax())
    for (k0, v0), (k1, v1) in zip(caches[False], caches[True]):
        torch.testing.assert_close(k1, k0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(HAS_CUDA or INTERPRETED or not HAS_TRITON, reason="the kernels run natively on CUDA")
def test_kernels_under_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "test_kernel_",
                           str(Path(__file__))], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-1000:]
