"""The embedded engine against the real reference (HF transformers + PEFT on the very same weights
and adapter files): greedy tokens identical and logits within 1e-4 relative, for every request of
one mixed batch in which each request uses a different adapter, plus base-model requests."""

from __future__ import annotations

import pytest
import torch

from lorascope import LLM, SamplingParams
from lorascope.reference import reference_generate

MAX_TOKENS = 32
PRESETS = ["tiny", "tiny-qwen2"]


def _requests(names: list[str], vocab: int) -> list[tuple[list[int], str | None]]:
    gen = torch.Generator().manual_seed(0)
    adapters: list[str | None] = [*names, None, None, None]
    reqs = []
    for i, name in enumerate(adapters):
        length = 5 + (i * 7) % 37  # unequal prompt lengths, 5..41
        reqs.append((torch.randint(0, vocab, (length,), generator=gen).tolist(), name))
    return reqs


@pytest.fixture(scope="module", params=PRESETS)
def case(request, model_dir, mixed_adapters):
    preset = request.param
    mdir, adapters = model_dir(preset), mixed_adapters(preset)
    from lorascope.model.presets import PRESETS as P

    reqs = _requests(sorted(adapters), P[preset].vocab_size)
    ref = reference_generate(mdir, adapters, reqs, MAX_TOKENS)
    return mdir, adapters, reqs, ref


def _run(mdir, adapters, reqs, **engine_args):
    llm = LLM(str(mdir), adapters, max_lora_rank=16, **engine_args)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, return_logits=True)
    if engine_args.get("max_loras", 0) >= len(adapters):
        llm.engine.preload(sorted(adapters))
    outs = llm.generate([p for p, _ in reqs], params, [a for _, a in reqs])
    llm.close()
    return llm, outs


def _assert_matches(outs, ref, reqs) -> None:
    for (_prompt, name), out, want in zip(reqs, outs, ref, strict=True):
        assert out.token_ids == want.token_ids, f"adapter {name}: tokens differ from HF+PEFT"
        got = torch.stack(out.logits)
        rel = ((got - want.logits).norm() / want.logits.norm()).item()
        assert rel < 1e-4, f"adapter {name}: logits relative error {rel:.2e}"


def test_one_mixed_batch_matches_hf_peft(case) -> None:
    mdir, adapters, reqs, ref = case
    llm, outs = _run(mdir, adapters, reqs, max_loras=len(adapters), max_num_batched_tokens=4096)
    first = llm.engine.steps[0]
    assert first.num_seqs == len(reqs) and first.num_adapters == len(adapters), "not one mixed batch"
    _assert_matches(outs, ref, reqs)


def test_paged_chunked_path_matches(case) -> None:
    """Tiny token budget and blocks: prompts are prefilled in chunks across steps and pages."""
    mdir, adapters, reqs, ref = case
    llm, outs = _run(mdir, adapters, reqs, max_loras=len(adapters), max_num_batched_tokens=24, block_size=4)
    assert any(s.num_tokens == 24 for s in llm.engine.steps), "prefill was never chunked"
    _assert_matches(outs, ref, reqs)


def test_few_slots_swap_adapters_and_stay_correct(case) -> None:
    """max_loras 3 < 10 adapters: slots are reused; both policies must still apply the right adapter."""
    mdir, adapters, reqs, ref = case
    for policy in ("fair", "vllm"):
        llm, outs = _run(mdir, adapters, reqs, max_loras=3, max_cpu_loras=4, policy=policy)
        assert llm.engine.cache.device_counters.evictions > 0
        assert max(s.num_adapters for s in llm.engine.steps) <= 3
        _assert_matches(outs, ref, reqs)


def test_adapters_change_the_output(case) -> None:
    """Guard against a blind test: each adapter must move the logits far beyond the 1e-4 tolerance
    (so a wrong or missing adapter cannot pass), and most must change the greedy tokens."""
    mdir, _, reqs, ref = case
    adapter_reqs = [(p, a) for p, a in reqs if a is not None]
    base = reference_generate(mdir, {}, [(p, None) for p, _ in adapter_reqs], MAX_TOKENS)
    for (_, name), b, r in zip(adapter_reqs, base, ref, strict=False):
        moved = ((r.logits[0] - b.logits[0]).norm() / b.logits[0].norm()).item()
        assert moved > 1e-2, f"adapter {name} moves the first logits by only {moved:.1e}"
    changed = sum(b.token_ids != r.token_ids for b, r in zip(base, ref, strict=False))
    assert changed >= len(adapter_reqs) // 2, f"only {changed}/{len(adapter_reqs)} adapters change the output"
