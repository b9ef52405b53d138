"""Pipelined steps (engine.py, `async_scheduling`): the host launches step n+1 before step n's tokens
reach it. On the CPU nothing actually overlaps, but the bookkeeping is the same as on CUDA (PENDING
ids, the device-side fill of the next step's inputs, settling, stop ids one step late, aborts while a
token is in flight), so it is checked here against the lockstep engine, token for token."""

from __future__ import annotations

import asyncio
import random

import pytest

from lorascope import LLM, SamplingParams
from lorascope.config import EngineConfig
from lorascope.engine.async_engine import AsyncLLMEngine
from lorascope.engine.request import PENDING


def _workload(seed: int, n: int, vocab: int = 250) -> tuple[list[list[int]], list[SamplingParams], list[str | None]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randrange(2, 40))] for _ in range(n)]
    params = []
    for i in range(n):
        kind = i % 7
        if kind == 3:  # sampled on the host: the step falls back to lockstep
            params.append(SamplingParams(max_tokens=rng.randrange(2, 12), temperature=0.9, seed=i))
        elif kind == 5:  # min_tokens pending: lockstep until reached
            params.append(SamplingParams(max_tokens=10, temperature=0.0, min_tokens=4, stop_token_ids=list(range(5, 250, 3))))
        else:  # greedy; many stop ids, so several requests stop early (one step late on the host)
            stops = [rng.randrange(5, vocab) for _ in range(25)]
            params.append(SamplingParams(max_tokens=rng.randrange(1, 20), temperature=0.0, stop_token_ids=stops,
                                         ignore_eos=rng.random() < 0.5))
    adapters = [None if i % 5 == 0 else f"a{i % 6:04d}" for i in range(n)]
    return prompts, params, adapters


@pytest.mark.parametrize(
    "knobs",
    [
        {"max_loras": 3, "max_num_seqs": 8, "max_num_batched_tokens": 64, "policy": "fair"},
        {"max_loras": 2, "max_num_seqs": 6, "max_num_batched_tokens": 32, "policy": "vllm"},
        # a KV cache too small for the batch: preemptions, some of a request with a token in flight
        {"max_loras": 4, "max_num_seqs": 12, "max_num_batched_tokens": 48, "num_kv_blocks": 24, "block_size": 4,
         "max_model_len": 64},
    ],
    ids=["fair", "vllm", "preempting"],
)
def test_pipelined_steps_give_the_lockstep_tokens(knobs) -> None:
    prompts, params, adapters = _workload(1, 30)
    results = {}
    for pipelined in (False, True):
        llm = LLM("tiny", "synthetic:6:8", lora_target_modules=("q_proj", "v_proj"), async_scheduling=pipelined, **knobs)
        done = llm.generate(prompts, params, adapters)
        results[pipelined] = [(c.token_ids, c.finish_reason) for c in done]
        if pipelined:
            eng = llm.engine
            assert not eng.requests and eng.blocks.num_used == 0 and eng._inflight is None
            assert all(PENDING not in c.token_ids for c in done)
            preempted = sum(c.metrics["preemptions"] for c in done)
        llm.close()
    assert results[True] == results[False]
    reasons = [r for _, r in results[True]]
    assert reasons.count("stop") >= 3 and reasons.count("length") >= 3, reasons  # both endings exercised
    if "num_kv_blocks" in knobs:
        assert preempted > 0, "the small KV cache should have forced preemptions"


def test_tokens_stay_pending_until_the_next_step_and_aborts_drop_them() -> None:
    llm = LLM("tiny", async_scheduling=True, max_num_seqs=4)
    eng = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a = eng.add_request([5, 6, 7, 8], params)
    b = eng.add_request([9, 10, 11], params)
    assert eng.step() == []  # both prefills launched; their first tokens are still on their way
    assert a.output_ids == [PENDING] and a.pending == 1 and not a.finished and eng.has_unfinished()
    progressed = eng.step()  # launches the first decode step, then settles the prefill's tokens
    assert set(progressed) == {a, b}
    assert a.num_resolved == 1 and a.output_ids[0] != PENDING and a.output_ids[1] == PENDING
    eng.abort(b.request_id)  # b has a token in flight: it is dropped, and b is finished at once
    assert b.finished and b.finish_reason == "abort" and PENDING not in b.output_ids and b.pending == 0
    seen: list = []
    while eng.has_unfinished():
        seen += eng.step()
    assert b not in seen, "an aborted request is never reported again"
    assert a.finished and a.finish_reason == "length" and len(a.output_ids) == 6 and PENDING not in a.output_ids
    lockstep = LLM("tiny", async_scheduling=False).generate([[5, 6, 7, 8]], params)[0]
    assert a.output_ids == lockstep.token_ids
    llm.close()


def test_a_stop_id_discards_the_token_computed_after_it() -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    free = LLM("tiny", async_scheduling=False).generate([[3, 4, 5]], params)[0].token_ids
    stop_at = free[4]
    k = free.index(stop_at)  # the first occurrence stops it
    stopped = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at])
    llm = LLM("tiny", async_scheduling=True)
    out = llm.generate([[3, 4, 5]], stopped)[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: k + 1]
    # the engine did compute a token past the stop id (launched before the stop was seen): one more step
    assert len(llm.engine.steps) == (k + 1) + 1
    llm.close()


def test_streams_of_a_pipelined_engine_never_show_pending_ids() -> None:
    prompts, params, adapters = _workload(2, 16)
    cfg = EngineConfig(model="tiny", max_loras=3, max_num_seqs=6, max_num_batched_tokens=40, async_scheduling=True,
                       lora_target_modules=("q_proj", "v_proj"))
    eng = AsyncLLMEngine(cfg, "synthetic:6:8")
    eng.start()

    async def one(p, sp, a):
        tokens, last = [], None
        async for delta in eng.generate(p, sp, a):
            assert PENDING not in delta.token_ids
            tokens += delta.token_ids
            assert delta.completion_tokens == len(tokens)
            last = delta
        return tokens, last.finish_reason

    async def main():
        return await asyncio.gather(*[one(p, sp, a) for p, sp, a in zip(prompts, params, adapters, strict=True)])

    try:
        streamed = asyncio.run(main())
    finally:
        eng.shutdown()
    llm = LLM("tiny", "synthetic:6:8", max_loras=3, max_num_seqs=6, max_num_batched_tokens=40, async_scheduling=False,
              lora_target_modules=("q_proj", "v_proj"))
    offline = [(c.token_ids, c.finish_reason) for c in llm.generate(prompts, params, adapters)]
    llm.close()
    assert streamed == offline


def test_gpu_trace_needs_a_cuda_engine() -> None:
    from lorascope.config import ConfigError

    llm = LLM("tiny", device="cpu", max_num_seqs=2)
    with pytest.raises(ConfigError, match="CUDA"):
        llm.engine.trace_gpu(True)
    llm.engine.trace_gpu(False)  # turning it off is always fine
    assert llm.engine.gpu_step_times() == []
    llm.close()


def test_blas_choice_defaults_to_cublaslt_and_names_a_bad_value() -> None:
    from lorascope.engine.runner import blas_choice

    assert blas_choice(None) == "cublaslt"
    assert blas_choice("default") == "default"
    with pytest.raises(ValueError, match=r"LORASCOPE_BLAS='cublas-lt' is not a BLAS choice; use one of cublaslt, cublas"):
        blas_choice("cublas-lt")
