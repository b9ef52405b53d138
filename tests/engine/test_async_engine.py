"""AsyncLLMEngine: streams equal the offline API, cancellation frees everything, overload is
refused before queueing, runtime adapters load (validated) and unload, input errors propagate."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from pathlib import Path

import pytest

from lorascope import LLM, SamplingParams
from lorascope.adapters.peft import AdapterError
from lorascope.config import EngineConfig
from lorascope.engine.async_engine import AsyncLLMEngine, OverloadedError
from lorascope.engine.engine import PromptError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def engine(model_dir, mixed_adapters):
    eng = AsyncLLMEngine(EngineConfig(model=str(model_dir("tiny")), max_loras=4, max_model_len=256, num_kv_blocks=128),
                         mixed_adapters("tiny"), max_waiting=8)
    eng.start()
    yield eng
    eng.shutdown()


async def collect(eng: AsyncLLMEngine, prompt, adapter, params=GREEDY) -> list[int]:
    tokens: list[int] = []
    async for delta in eng.generate(prompt, params, adapter):
        tokens += delta.token_ids
        if delta.finished:
            assert delta.finish_reason == "length" and delta.completion_tokens == len(tokens)
    return tokens


def test_streams_equal_the_offline_api(engine, model_dir, mixed_adapters) -> None:
    names = sorted(mixed_adapters("tiny"))[:5]
    prompts = [[1 + i, 2, 3, 4 + i] for i in range(6)]
    adapters = [*names, None]

    async def main():
        return await asyncio.gather(*[collect(engine, p, a) for p, a in zip(prompts, adapters, strict=True)])

    streamed = asyncio.run(main())
    llm = LLM(str(model_dir("tiny")), mixed_adapters("tiny"), max_loras=4, max_model_len=256, num_kv_blocks=128)
    offline = [o.token_ids for o in llm.generate(prompts, GREEDY, adapters)]
    llm.close()
    assert streamed == offline


def test_a_consumer_that_falls_behind_gets_the_missed_steps_in_one_delta(engine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def read(slow: bool) -> list[list[int]]:
        chunks = []
        async for delta in engine.generate([5, 6, 7, 8], params):
            chunks.append(delta.token_ids)
            if slow:
                await asyncio.sleep(0.05)  # several steps go by: they queue up for this stream
            if delta.finished:
                assert delta.completion_tokens == sum(map(len, chunks)) == 40
        return chunks

    fast, slow = asyncio.run(read(False)), asyncio.run(read(True))
    assert list(itertools.chain(*fast)) == list(itertools.chain(*slow))  # the same tokens, in order
    assert max(map(len, slow)) > 1 and len(slow) < len(fast)


def test_cancelled_streams_free_blocks_and_adapters(engine, mixed_adapters) -> None:
    names = sorted(mixed_adapters("tiny"))
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        async def first_chunk_then_leave(i: int) -> None:
            async for _ in engine.generate([1, 2, 3, i], long, names[i % 4]):
                break  # the consumer goes away: the generator is closed, the request aborted

        await asyncio.gather(*[first_chunk_then_leave(i) for i in range(8)])
        for _ in range(100):
            snap = await engine.snapshot()
            if snap.num_running == snap.num_waiting == snap.kv_blocks_used == snap.adapter_refs == 0:
                return snap
            await asyncio.sleep(0.02)
        return snap

    snap = asyncio.run(main())
    assert (snap.num_running, snap.num_waiting, snap.kv_blocks_used, snap.adapter_refs) == (0, 0, 0, 0)


def test_overload_is_refused_before_queueing(engine) -> None:
    long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)

    async def main():
        results = await asyncio.gather(*[collect(engine, [1, 2, i], None, long) for i in range(40)], return_exceptions=True)
        return results, await engine.snapshot()

    results, snap = asyncio.run(main())
    refused = [r for r in results if isinstance(r, OverloadedError)]
    done = [r for r in results if isinstance(r, list)]
    assert refused and done and len(refused) + len(done) == 40
    assert all(len(r) == 64 for r in done)
    assert snap.kv_blocks_used == 0


def test_input_errors_propagate_and_the_engine_keeps_serving(engine) -> None:
    async def main():
        with pytest.raises(PromptError, match="256"):
            await collect(engine, [7] * 300, None)
        with pytest.raises(AdapterError, match="nope"):
            await collect(engine, [1, 2], "nope")
        return await collect(engine, [1, 2], None)

    assert len(asyncio.run(main())) == GREEDY.max_tokens


def test_runtime_load_and_unload(engine, mixed_adapters, tmp_path: Path) -> None:
    src = next(iter(mixed_adapters("tiny").values()))
    good = tmp_path / "fresh"
    shutil.copytree(src, good)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "adapter_model.safetensors").unlink()

    async def main():
        with pytest.raises(AdapterError, match="broken"):
            await engine.load_adapter("broken", broken)
        await engine.load_adapter("fresh", good)
        with pytest.raises(AdapterError, match="already"):
            await engine.load_adapter("fresh", good)
        tokens = await collect(engine, [5, 6, 7], "fresh")
        await engine.unload_adapter("fresh")
        with pytest.raises(AdapterError, match="fresh"):
            await collect(engine, [5, 6, 7], "fresh")
        with pytest.raises(AdapterError, match="not loaded"):
            await engine.unload_adapter("fresh")
        return tokens, await engine.snapshot()

    tokens, snap = asyncio.run(main())
    assert len(tokens) == GREEDY.max_tokens
    assert "fresh" not in snap.device_resident and "fresh" not in snap.host_resident
    assert "broken" not in engine.adapter_names()


def test_a_refused_duplicate_id_does_not_abort_the_live_request(engine) -> None:
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main():
        first = engine.generate([1, 2, 3], long, None, request_id="same")
        head = await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            async for _ in engine.generate([4, 5], long, None, request_id="same"):
                pass
        tokens = list(head.token_ids)
        async for delta in first:
            tokens += delta.token_ids
        return tokens

    assert len(asyncio.run(main())) == 40
