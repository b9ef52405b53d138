"""Packed projections (Decoder.pack_projections): q/k/v and gate/up each in one weight, so one GEMM
each. The packed model computes what the unpacked one does, holds no second copy of the weights, and
keeps Hugging Face's parameter names and state_dict. On the CPU each output is the same dot product,
and mostly equal to the bit; but the BLAS may pick another kernel for the wider matrix (tiny's gate/up
at 4-5 tokens: 3e-7 apart), so float32 results are held to 1e-6, not to equality.

The GPU path (lora_multi_triton and the fused kernels on column-slice views) runs here under Triton's
interpreter: `test_kernels_under_triton_interpreter` starts this file again with TRITON_INTERPRET=1
(read when triton is imported) and selects the `test_kernel_` tests; on a CUDA device they run there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from _kernel_marks import kernel_test, run_file_under_interpreter
from lorascope import LLM, SamplingParams
from lorascope.kernels.fused_triton import HAS_TRITON
from lorascope.model.decoder import Decoder
from lorascope.model.layers import LoRALinear, project
from lorascope.model.weights import load_model, save_model

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"
PRESETS = ["tiny", "tiny-qwen2"]  # tiny-qwen2: q/k/v biases


def _groups(model: Decoder) -> list[tuple[torch.nn.Module, tuple[LoRALinear, ...]]]:
    return [g for layer in model.model.layers for g in ((layer.self_attn, layer.self_attn.qkv), (layer.mlp, layer.mlp.gate_up))]


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# --- the engine, CPU path ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_engine_matches_unpacked(preset: str, model_dir, mixed_adapters) -> None:
    """A mixed batch (10 adapters of ranks 8/16 on all or attention-only targets, plus base requests,
    prefill and decode): the same tokens, logits within 1e-6."""
    adapters = mixed_adapters(preset)
    names: list[str | None] = [*sorted(adapters), None, None]
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 250, (3 + (7 * i) % 29,), generator=gen).tolist() for i in range(len(names))]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, return_logits=True)
    outs = {}
    for packed in (False, True):
        llm = LLM(str(model_dir(preset)), adapters, max_lora_rank=16, max_loras=len(adapters))
        model = llm.engine.runner.model
        if packed:
            model.pack_projections()
        else:  # the baseline, whatever the runner chose
            model.unpack_projections()
        assert all((g.packed is not None) == packed for g, _ in _groups(model))
        outs[packed] = llm.generate(prompts, params, names)
        llm.close()
    for name, want, got in zip(names, outs[False], outs[True], strict=True):
        assert got.token_ids == want.token_ids, f"adapter {name}: packed tokens differ"
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-6, atol=1e-6)


# --- memory, names, idempotence -----------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_pack_makes_views_and_frees_the_old_weights(preset: str) -> None:
    model = load_model(preset).model
    before = {name: p.clone() for name, p in model.state_dict().items()}
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    old = [t.untyped_storage()._weak_ref() for _, lins in _groups(model) for lin in lins
           for t in (lin.weight, lin.bias) if t is not None]
    model.pack_projections()
    try:
        assert all(torch.UntypedStorage._expired(ref) for ref in old), "a pre-packing weight is still alive"
    finally:
        for ref in old:
            torch.UntypedStorage._free_weak_ref(ref)
    has_bias = model.cfg.attention_bias
    for group, lins in _groups(model):
        packed = group.packed
        assert packed.weight.is_contiguous() and packed.weight.shape[0] == sum(lin.weight.shape[0] for lin in lins)
        assert (packed.bias is not None) == (has_bias and len(lins) == 3)
        for lin, a in zip(lins, packed.bounds):
            assert _storage_ptr(lin.weight) == _storage_ptr(packed.weight)
            assert lin.weight.data_ptr() == packed.weight[a].data_ptr()
            if lin.bias is not None:
                assert _storage_ptr(lin.bias) == _storage_ptr(packed.bias)
                assert lin.bias.data_ptr() == packed.bias[a:].data_ptr()
    # every parameter's storage counted once: exactly the parameters' bytes, nothing doubled
    storages = {_storage_ptr(p): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == params_bytes
    after = model.state_dict()
    assert list(after) == list(before)  # HF names, same order
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_pack_is_idempotent_and_unpack_restores() -> None:
    model = load_model("tiny-qwen2").model
    model.pack_projections()
    packs = [g.packed for g, _ in _groups(model)]
    ptrs = [p.data_ptr() for p in model.parameters()]
    model.pack_projections()
    assert all(g.packed is p for (g, _), p in zip(_groups(model), packs))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    before = {name: p.clone() for name, p in model.state_dict().items()}
    model.unpack_projections()
    for group, lins in _groups(model):
        assert group.packed is None
        assert len({_storage_ptr(lin.weight) for lin in lins}) == len(lins)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_replaced_weights_are_caught_and_repacked() -> None:
    """A reload or `.to()` after packing gives the linears tensors of their own: project() must not
    keep multiplying by the stale packed copy; packing again picks up the new values."""
    model = load_model("tiny").model
    model.pack_projections()
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, model.cfg.hidden_size)
    ctx = _no_lora_ctx()
    with torch.no_grad():
        attn.k_proj.weight.data = attn.k_proj.weight * 2
    with pytest.raises(RuntimeError, match="pack_projections"):
        project(x, attn.qkv, ctx, attn.packed)
    model.pack_projections()
    got = project(x, attn.qkv, ctx, attn.packed)
    want = project(x, attn.qkv, ctx)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_save_after_packing_round_trips(tmp_path: Path) -> None:
    """save_model writes the views (safetensors takes disjoint views of one storage) as HF tensors."""
    loaded = load_model("tiny-qwen2")
    loaded.model.pack_projections()
    save_model(loaded, tmp_path / "m")
    again = load_model(str(tmp_path / "m")).model.state_dict()
    ours = loaded.model.state_dict()
    assert again.keys() == ours.keys()
    assert all(torch.equal(again[k], v) for k, v in ours.items())


def _no_lora_ctx():
    from lorascope.model.context import StepContext

    return StepContext(None, [], None)  # project() reads only ctx.lora


# --- the GPU path: lora_multi_triton and the fused kernels on column-slice views -----------------------


def _slot_store(model: Decoder, gen: torch.Generator, dtype: torch.dtype):
    from lorascope.model.config import LORA_TARGET_MODULES
    from lorascope.model.lora import HostAdapter, LoRASlotStore

    cfg = model.cfg
    store = LoRASlotStore(cfg, max_loras=3, max_rank=16, dtype=dtype, device=torch.device(DEVICE))
    for slot, rank in enumerate((8, 16, 4)):
        weights = {}
        for layer in range(cfg.num_hidden_layers):
            for module in LORA_TARGET_MODULES:
                fan_in, fan_out = cfg.module_shape(module)
                weights[layer, module] = ((torch.randn(rank, fan_in, generator=gen) * 0.1).to(dtype),
                                          (torch.randn(fan_out, rank, generator=gen) * 0.1).to(dtype))
        scales = {m: 2.0 / (slot + 1) for m in LORA_TARGET_MODULES}
        store.write(slot, HostAdapter(f"a{slot}", weights, scales, rank))
    model.attach_lora(store)
    return store


# 3 decode tokens (slots 0, 1, base), a 4-token prefill chunk on slot 2, a 2-token one on slot 0; and a
# lone decode token (the 1-token graph bucket: its [1, n] slices count as dense, so empty_like keeps
# the packed row stride)
MIXED = ([1, 1, 1, 4, 2], [9, 5, 12, 4, 7], [(0, 1, 0), (1, 2, 1), (3, 7, 2), (7, 9, 0)])
ONE = ([1], [6], [(0, 1, 1)])


@kernel_test
@pytest.mark.parametrize(("dtype", "case"), [(torch.float32, MIXED), (torch.bfloat16, MIXED), (torch.float32, ONE)],
                         ids=["f32-mixed", "bf16-mixed", "f32-one-token"])
def test_kernel_packed_layers_match_unpacked(dtype: torch.dtype, case) -> None:
    """One layer of tiny-qwen2 (q/k/v biases) with the GPU path's kernels: project() through
    lora_multi_triton, rope_and_cache on the q/k/v column slices, silu_mul on gate/up's, then paged
    attention and down_proj; packed and unpacked give the same outputs and the same KV cache rows
    (the same kernels on the same values: equal but for the base GEMM's BLAS, held to 1e-6 / 1 ulp)."""
    from lorascope.kernels.attention import AttentionMetadata
    from lorascope.kernels.lora_triton import LoRAMeta
    from lorascope.model.context import StepContext
    from lorascope.model.lora import LoRABatch

    loaded = load_model("tiny-qwen2", dtype="float32" if dtype == torch.float32 else "bfloat16", device=DEVICE, max_len=256)
    model, cfg = loaded.model, loaded.cfg
    gen = torch.Generator().manual_seed(0)
    store = _slot_store(model, gen, dtype)
    q_lens, kv_lens, segments = case
    tables = [[4 * i + j for j in range(4)] for i in range(len(q_lens))]
    tokens = sum(q_lens)
    positions = torch.tensor([k - q + i for q, k in zip(q_lens, kv_lens) for i in range(q)], device=DEVICE)
    attn_meta = AttentionMetadata.build(q_lens, kv_lens, tables, 4, None, torch.device(DEVICE))
    lora_meta = LoRAMeta.build(segments, {m: store.ranks[m] for m in store.modules},
                               {m: store.scales[m] for m in store.modules}, DEVICE)
    cache = torch.randn(2, 20 * 4, cfg.num_key_value_heads, cfg.head_dim, generator=gen).to(DEVICE, dtype)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).to(DEVICE, dtype)
    layer = model.model.layers[0]
    outs = {}
    for packed in (False, True):
        if packed:
            model.pack_projections()
        else:
            model.unpack_projections()
        k_cache, v_cache = cache[0].clone(), cache[1].clone()
        ctx = StepContext(attn_meta, [(k_cache, v_cache)], LoRABatch(segments, kernel_meta=lora_meta))
        with torch.no_grad():
            a = layer.self_attn(x, positions, ctx, fused=True)
            m = layer.mlp(x, ctx, fused=True)
        outs[packed] = (a, m, k_cache, v_cache)
    # the packed outputs really are strided views: row stride = the packed width
    q, _, _ = project(x, layer.self_attn.qkv, StepContext(attn_meta, [], None), layer.self_attn.packed)
    assert q.stride(0) == cfg.q_size + 2 * cfg.kv_size and (tokens == 1 or not q.is_contiguous())
    for name, got, want in zip(("attn", "mlp", "k_cache", "v_cache"), outs[True], outs[False]):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3, msg=name)


def test_kernels_under_triton_interpreter() -> None:
    if HAS_CUDA or INTERPRETED:
        pytest.skip("the kernel tests run directly here")
    if not HAS_TRITON:
        pytest.skip("needs triton (its interpreter)")
    run_file_under_interpreter(__file__)
