"""The fused GPU kernels (kernels/fused_triton.py) compute what the torch layers compute.

On a CUDA device the kernel tests run there; without one, `test_kernels_under_triton_interpreter` runs
this file again in a subprocess with TRITON_INTERPRET=1 (set before triton is imported), on CPU
tensors. The interpreter truncates float32 -> bfloat16 instead of rounding (lora_triton.py), so bf16
results are compared almost exactly on CUDA and within a few bf16 ulps under the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from _kernel_marks import kernel_test, run_file_under_interpreter
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


def _lora_layer(dtype: torch.dtype):
    """One layer's q/k/v and gate/up with LoRA on q, v, gate and up (not k), 5 slots of mixed ranks (one
    empty), a capacity-built step meta (padding segments, as a graph's) with a base token in between."""
    from lorascope.kernels.lora_triton import LoRAMeta

    gen = torch.Generator().manual_seed(11)
    hidden, heads, kv_heads, head_dim, inter, slots, max_rank = 64, 4, 2, 16, 96, 5, 16
    outs = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
            "gate_proj": inter, "up_proj": inter}
    lora_mods = ("q_proj", "v_proj", "gate_proj", "up_proj")
    ranks = {m: [16, 8, 0, 16, 8] for m in lora_mods}
    scales = {m: [0.5, 2.0, 0.0, 1.0, 1.5] for m in lora_mods}
    a = {m: (torch.randn(slots, max_rank, hidden, generator=gen) * 0.3).to(dtype).to(DEVICE) for m in lora_mods}
    b = {m: (torch.randn(slots, outs[m], max_rank, generator=gen) * 0.3).to(dtype).to(DEVICE) for m in lora_mods}
    segments = [(0, 3, 3), (4, 5, 1), (5, 9, 0)]  # token 3: a base request (no segment)
    meta = LoRAMeta.build(segments, ranks, scales, DEVICE, capacity=6, max_len_bound=9)
    w = {m: (torch.randn(n, hidden, generator=gen) * hidden**-0.5).to(dtype).to(DEVICE) for m, n in outs.items()}
    x = torch.randn(9, hidden, generator=gen).to(DEVICE)
    delta = torch.randn(9, hidden, generator=gen).to(dtype).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    return dict(gen=gen, heads=heads, kv_heads=kv_heads, head_dim=head_dim, a=a, b=b, meta=meta, w=w, x=x,
                delta=delta, norm_w=norm_w, segments=segments, ranks=ranks, scales=scales)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 4])
def test_kernel_fused_lora_matches_the_grouped_kernels(dtype: torch.dtype, splits: int) -> None:
    """The shrink folded into add_rmsnorm and the expand into rotary / SiLU give what the grouped LoRA
    kernels give between the unfused norm, rotary and SiLU kernels: q, the K/V cache rows, SiLU's output,
    and u against A @ h in float64; with the row's shrink in one program and split over four."""
    from lorascope.kernels.fused_triton import FusedLoRA, LoRAModule, add_rmsnorm_shrink, shrunk_u
    from lorascope.kernels.lora_triton import lora_multi_triton

    L = _lora_layer(dtype)
    meta, a, b, w = L["meta"], L["a"], L["b"], L["w"]
    heads, kv_heads, d = L["heads"], L["kv_heads"], L["head_dim"]
    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d, max_position_embeddings=64)
    rotary = Rotary(cfg, 64)
    rotary.materialize(torch.device(DEVICE))
    positions = torch.tensor([0, 1, 2, 30, 7, 3, 4, 5, 6], device=DEVICE)
    rows = 20
    cache_slots = torch.randperm(rows, generator=L["gen"])[:9].to(DEVICE)

    def mod(m: str) -> LoRAModule:
        return LoRAModule(a[m], b[m], meta[m].rank, meta[m].scale)

    results = {}
    for fused in (False, True):
        res = L["x"].clone()
        caches = [torch.full((rows, kv_heads, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
        qkv_lora = FusedLoRA((mod("q_proj"), None, mod("v_proj")), meta["q_proj"].seg)
        if fused:
            res, h, qkv_lora = add_rmsnorm_shrink(res, L["delta"], L["norm_w"], 1e-5, qkv_lora, splits)
        else:
            h = add_rmsnorm(res, L["delta"], L["norm_w"], 1e-5)
        q, k, v = (h @ w[m].T for m in ("q_proj", "k_proj", "v_proj"))
        if not fused:
            lora_multi_triton(h, [(q, a["q_proj"], b["q_proj"], meta["q_proj"]), (v, a["v_proj"], b["v_proj"], meta["v_proj"])])
        q = q.view(9, heads, d)
        rope_and_cache(q, k.view(9, kv_heads, d), v.view(9, kv_heads, d), rotary.cos, rotary.sin, positions, cache_slots,
                       caches[0], caches[1], lora=qkv_lora if fused else None)
        gu_lora = FusedLoRA((mod("gate_proj"), mod("up_proj")), meta["gate_proj"].seg)
        if fused:
            res, h2, gu_lora = add_rmsnorm_shrink(res, L["delta"], L["norm_w"], 1e-5, gu_lora, splits)
        else:
            h2 = add_rmsnorm(res, L["delta"], L["norm_w"], 1e-5)
        gate, up = h2 @ w["gate_proj"].T, h2 @ w["up_proj"].T
        if not fused:
            lora_multi_triton(h2, [(gate, a["gate_proj"], b["gate_proj"], meta["gate_proj"]),
                                   (up, a["up_proj"], b["up_proj"], meta["up_proj"])])
        act = silu_mul(gate, up, gu_lora if fused else None)
        results[fused] = (res, h, q, caches[0][cache_slots], caches[1][cache_slots], h2, act)
        if fused:
            # u against float64: token t of segment (start, end, slot), rows past the rank add nothing
            for plane, m in enumerate(("q_proj", "v_proj")):
                want = torch.zeros(9, 16, dtype=torch.float64)
                for start, end, slot in L["segments"]:
                    r = L["ranks"][m][slot]
                    want[start:end, :r] = L["scales"][m][slot] * (h[start:end].double().cpu() @ a[m][slot, :r].double().cpu().T)
                assert qkv_lora.u.shape[0] == splits
                got = shrunk_u(qkv_lora, plane, dtype).double().cpu()
                assert got[3].abs().max() == 0, "the base token (no segment) got a shrink"
                torch.testing.assert_close(got, want, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                           atol=1e-2 if dtype != torch.float32 else 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -5, atol=2 ** -5)
    for name, got, want in zip(("residual", "h", "q", "k cache", "v cache", "h2", "silu"), results[True], results[False]):
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")
    # the base token's rows are the plain kernels' (no LoRA): bit for bit
    assert torch.equal(results[True][2][3], results[False][2][3])


@pytest.mark.skipif(HAS_CUDA or INTERPRETED or not HAS_TRITON, reason="the kernels run natively on CUDA")
def test_kernels_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__)
