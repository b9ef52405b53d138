"""Requests in and out of the engine: clear errors for bad prompts, adapters, ids and configs; text
prompts; base and adapter requests in one call; abort; the shapes `LLM.generate` accepts."""

from __future__ import annotations

import pytest
import torch

from lorascope import LLM, Completion, EngineConfig, SamplingParams
from lorascope.adapters.peft import AdapterError
from lorascope.config import ConfigError
from lorascope.engine.engine import PromptError
from lorascope.model.tokenizer import BOS_ID, BUILTIN_VOCAB_SIZE


@pytest.fixture(scope="module")
def llm():
    llm = LLM("tiny", max_model_len=64, num_kv_blocks=128, block_size=4)
    yield llm
    llm.close()


def _idle(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_unfinished() and not eng.requests, "a rejected request was left in the engine"
    assert eng.blocks.num_free == eng.blocks.num_blocks


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [64, 70, 500])
def test_too_long_prompt_names_both_lengths(llm, length: int) -> None:
    with pytest.raises(PromptError, match=rf"{length} tokens.*context is 64"):
        llm.generate([[1] * length], SamplingParams(max_tokens=1))
    _idle(llm)


def test_prompt_one_below_context_generates_until_full(llm) -> None:
    out = llm.generate([[1] * 63], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    out = llm.generate([[1] * 60], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_empty_prompt(llm) -> None:
    with pytest.raises(PromptError, match="empty"):
        llm.engine.add_request([])
    with pytest.raises(PromptError, match="empty"):
        llm.generate([[]])
    _idle(llm)


@pytest.mark.parametrize("bad", [BUILTIN_VOCAB_SIZE, BUILTIN_VOCAB_SIZE + 1000, -1, 3.0])
def test_token_outside_vocabulary(llm, bad) -> None:
    with pytest.raises(PromptError, match=rf"{bad!r}.*\[0, {BUILTIN_VOCAB_SIZE}\)"):
        llm.generate([[5, bad, 6]])
    _idle(llm)


def test_unknown_adapter_is_named(llm) -> None:
    with pytest.raises(AdapterError, match=r"'no-such-adapter'.*pass an adapter directory"):
        llm.generate([[1, 2, 3]], adapter="no-such-adapter")
    _idle(llm)


def test_unknown_adapter_among_registered(model_dir, mixed_adapters) -> None:
    adapters = mixed_adapters("tiny")
    llm = LLM(str(model_dir("tiny")), adapters, max_loras=2, num_kv_blocks=64, max_model_len=64)
    with pytest.raises(AdapterError, match=r"'all-a0099'.*10 registered \(e\.g\. "):
        llm.engine.add_request([1, 2], adapter="all-a0099")
    _idle(llm)
    llm.close()


def test_duplicate_request_id(llm) -> None:
    first = llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), request_id="same")
    with pytest.raises(ValueError, match="'same' is already in use"):
        llm.engine.add_request([4, 5, 6], SamplingParams(max_tokens=2), request_id="same")
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert first.finished and len(first.output_ids) == 2
    # once finished, the id is free again
    again = llm.engine.add_request([4, 5, 6], SamplingParams(max_tokens=1), request_id="same")
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert again.finished
    _idle(llm)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"max_loras": 4, "max_cpu_loras": 2}, ["max_cpu_loras", "max_loras"]),
        ({"policy": "x"}, ["policy", "'x'", "fair", "vllm"]),
        ({"max_loras": 0}, ["max_loras"]),
        ({"fair_quantum_steps": 0}, ["fair_quantum_steps"]),
        ({"fair_max_park_steps": -4}, ["fair_max_park_steps"]),
        ({"max_num_seqs": -1}, ["max_num_seqs"]),
        ({"block_size": 0}, ["block_size"]),
        ({"num_kv_blocks": 0}, ["num_kv_blocks"]),
        ({"max_model_len": 0}, ["max_model_len"]),
        ({"eviction": "random"}, ["eviction", "lru"]),
        ({"dtype": "int8"}, ["dtype", "float32"]),
        ({"lora_target_modules": ("q_proj", "qkv_proj")}, ["lora_target_modules", "qkv_proj"]),
    ],
)
def test_engine_config_errors_name_the_knob(kwargs: dict, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig(**kwargs)
    for name in names:
        assert name in str(info.value)
    # LLM(...) takes the same knobs and fails the same way, before building anything
    with pytest.raises(ConfigError, match=names[0]):
        LLM("tiny", **kwargs)


def test_engine_config_defaults() -> None:
    cfg = EngineConfig(max_loras=3)
    assert cfg.max_cpu_loras == 3
    EngineConfig(lora_target_modules=("q_proj", "down_proj"))


# --- text, mixing, abort, generate's shapes ---------------------------------------------------


def test_text_prompt_round_trips(llm) -> None:
    text = "Hello, wörld!"
    out = llm.generate(text, SamplingParams(max_tokens=6, temperature=0))
    assert isinstance(out, list) and len(out) == 1
    (c,) = out
    assert isinstance(c, Completion) and isinstance(c.text, str)
    assert c.prompt_ids[0] == BOS_ID
    assert c.prompt_ids[1:] == list(text.encode())
    tok = llm.engine.tokenizer
    assert tok.decode(c.prompt_ids) == text  # BOS is special: skipped
    assert c.text == tok.decode(c.token_ids)


def test_single_token_list_and_str_list(llm) -> None:
    assert len(llm.generate([1, 2, 3], SamplingParams(max_tokens=1))) == 1
    outs = llm.generate(["a", "bb", "ccc"], SamplingParams(max_tokens=2, temperature=0))
    assert [len(o.prompt_ids) for o in outs] == [2, 3, 4]
    assert llm.generate([]) == []


def test_length_mismatch_raises(llm) -> None:
    with pytest.raises(ValueError, match="2 prompts but 3 params"):
        llm.generate(["a", "b"], [SamplingParams()] * 3)
    with pytest.raises(ValueError, match="2 prompts but 2 params and 1 adapters"):
        llm.generate(["a", "b"], [SamplingParams()] * 2, [None])
    _idle(llm)


def test_bad_prompt_in_a_batch_leaves_nothing_queued() -> None:
    llm = LLM("tiny", max_model_len=64, num_kv_blocks=64)
    with pytest.raises(PromptError):
        llm.generate([[1, 2, 3], [4, 5], [1] * 70])
    try:
        _idle(llm)
    finally:
        llm.close()


def test_params_list_is_applied_per_prompt(llm) -> None:
    outs = llm.generate(["a", "b", "c"], [SamplingParams(max_tokens=n, ignore_eos=True) for n in (1, 2, 3)])
    assert [len(o.token_ids) for o in outs] == [1, 2, 3]


@pytest.fixture(scope="module")
def adapter_llm(model_dir, mixed_adapters):
    adapters = mixed_adapters("tiny")
    llm = LLM(
        str(model_dir("tiny")),
        adapters,
        max_loras=4,
        max_cpu_loras=6,
        max_lora_rank=16,
        num_kv_blocks=256,
        block_size=4,
        max_model_len=128,
    )
    yield llm, sorted(adapters)
    llm.close()


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (5 + 4 * i % 13,), generator=gen).tolist() for i in range(n)]


def test_base_and_adapter_requests_in_one_call(adapter_llm) -> None:
    llm, names = adapter_llm
    prompts = _prompts(8, seed=1)
    which: list[str | None] = [None, names[0], None, names[5], names[0], None, names[7], names[2]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    mixed = llm.generate(prompts, params, which)
    base_alone = llm.generate(prompts, params)
    assert [o.adapter for o in mixed] == which
    for o, b, a in zip(mixed, base_alone, which, strict=True):
        assert len(o.token_ids) == 8 and o.finish_reason == "length" and o.error is None
        if a is None:
            assert o.token_ids == b.token_ids, "a base request changed when batched with adapter requests"
    changed = sum(o.token_ids != b.token_ids for o, b, a in zip(mixed, base_alone, which, strict=True) if a)
    assert changed >= 4, "the adapters did not change the output: are they applied?"
    # the same adapter on two prompts in one batch vs. that adapter alone
    alone = llm.generate([prompts[4]], params, names[0])[0]
    assert alone.token_ids == mixed[4].token_ids
    assert max(s.num_adapters for s in llm.engine.steps) >= 2, "never more than one adapter in a step"
    assert not llm.engine.cache.refs
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_abort_running_request_frees_blocks_and_adapter(adapter_llm) -> None:
    llm, names = adapter_llm
    eng = llm.engine
    prompts = _prompts(4, seed=2)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    victim = eng.add_request(prompts[0], params, names[1], request_id="victim")
    keep = [eng.add_request(p, params, a) for p, a in zip(prompts[1:], [names[1], None, names[3]], strict=True)]
    waiting = eng.add_request(prompts[1], params, names[2], request_id="never-runs")
    eng.abort("never-runs")  # aborting a waiting request
    assert waiting.finish_reason == "abort" and waiting not in eng.scheduler.waiting
    for _ in range(200):
        eng.step()
        if victim.status.value == "running" and len(victim.output_ids) >= 3:
            break
    assert victim.status.value == "running", "the victim never started"
    refs_before, free_before, held = eng.cache.refs[names[1]], eng.blocks.num_free, len(victim.block_table)
    assert held > 0 and refs_before == 2
    eng.abort("victim")
    assert victim.finished and victim.finish_reason == "abort"
    assert victim.block_table == [] and eng.blocks.num_free == free_before + held
    assert eng.cache.refs[names[1]] == refs_before - 1
    assert victim not in eng.scheduler.running and "victim" not in eng.requests
    eng.abort("victim")  # twice: a no-op
    eng.abort("unknown-id")  # unknown: a no-op
    steps_before = len(victim.output_ids)
    while eng.has_unfinished():
        eng.step()
    assert len(victim.output_ids) == steps_before, "an aborted request kept generating"
    assert all(r.finish_reason == "length" and len(r.output_ids) == 30 for r in keep)
    assert not eng.cache.refs, f"adapter references left: {dict(eng.cache.refs)}"
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert not eng.requests
