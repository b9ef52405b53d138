"""The server under load, read through /metrics: the LoRA gauge follows requests as they arrive and
finish; overload answers 429 with Retry-After; clients that vanish mid-stream leak nothing."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

LONG = 8000  # output tokens: requests still run while the test looks (they are dropped, never finished)
LONG_CONTEXT = {"max_model_len": 8192}


def _lora_info(server) -> tuple[set[str], set[str], str]:
    (labels, value), = server.metrics()["vllm:lora_requests_info"]
    assert abs(value - time.time()) < 60, "the gauge's value is the Unix time of the scrape"
    split = lambda s: set(s.split(",")) - {""}  # noqa: E731
    return split(labels["running_lora_adapters"]), split(labels["waiting_lora_adapters"]), labels["max_lora"]


def _assert_nothing_leaked(server) -> dict:
    m = server.wait_idle()
    assert m["lorascope:num_requests_waiting"][0][1] == 0 and m["lorascope:num_requests_running"][0][1] == 0
    assert m["lorascope:kv_blocks_used"][0][1] == 0, "KV blocks leaked"
    assert m["lorascope:adapter_refs"][0][1] == 0, "adapter references leaked"
    return m


def _body(model: str, max_tokens: int = LONG, stream: bool = True) -> dict:
    return {"model": model, "prompt": [11, 12, 13, 14], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def _first_chunk_then(url: str, body: dict, hold: asyncio.Event | None) -> int:
    """Stream one request, read its first chunk, then wait for `hold` (or not) and drop the connection."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code == 200:
            # keep the iterator: dropping it mid-way would close the connection (httpcore does so)
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            if hold is not None:
                await hold.wait()
        return r.status_code  # leaving the block drops the connection with the request unfinished


async def _until(check, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out waiting for the server's state"
        await asyncio.sleep(0.02)


def test_lora_gauge_follows_requests(tiny, start_server) -> None:
    names = sorted(tiny[1])[:3]
    with start_server(*tiny, max_loras=2, max_cpu_loras=4, policy="vllm", **LONG_CONTEXT) as s:
        assert _lora_info(s) == (set(), set(), "2")

        async def scenario() -> tuple[set[str], set[str]]:
            hold = asyncio.Event()
            tasks = [asyncio.create_task(_first_chunk_then(s.url, _body(n), hold)) for n in names[:2]]
            await _until(lambda: _lora_info(s)[0] == set(names[:2]))
            third = asyncio.create_task(_first_chunk_then(s.url, _body(names[2]), hold))
            # the third waits: vllm's policy caps distinct adapters per step at max_loras=2
            await _until(lambda: bool(_lora_info(s)[1]))
            running, waiting, _ = await asyncio.to_thread(_lora_info, s)
            hold.set()
            assert {await t for t in [*tasks, third]} == {200}
            return running, waiting

        running, waiting = asyncio.run(scenario())
        assert running == set(names[:2]), "running_lora_adapters must list the adapters of the running requests"
        assert waiting == {names[2]}, "waiting_lora_adapters must list the adapter held back by the cap"
        _assert_nothing_leaked(s)
        assert _lora_info(s)[:2] == (set(), set()), "the gauge must empty once requests finish"
        m = s.metrics()
        assert len(m["vllm:lora_requests_info"]) == 1, "only the current combination is exposed"
        loads = {labels["tier"]: v for labels, v in m["lorascope:adapter_loads_total"]}
        assert loads["device"] >= 3 and loads["host"] >= 3, loads
        (_, steps), = m["lorascope:step_adapters_count"]
        biggest = max(le for labels, v in m["lorascope:step_adapters_bucket"]
                      for le in [float(labels["le"])] if v < steps)  # some step ran 2 adapters, none 3
        assert steps > 0 and biggest == 1.0, m["lorascope:step_adapters_bucket"]


def test_overload_answers_429_and_leaks_nothing(tiny, start_server) -> None:
    max_waiting, names = 2, sorted(tiny[1])
    with start_server(*tiny, max_waiting=max_waiting, max_num_seqs=2) as s:

        async def one(i: int) -> tuple[int, str | None, int]:
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c, \
                    c.stream("POST", "/v1/completions", json=_body(names[i % len(names)], 100)) as r:
                chunks = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                return r.status_code, r.headers.get("retry-after"), len(chunks)

        async def burst() -> list[tuple[int, str | None, int]]:
            return await asyncio.gather(*(one(i) for i in range(10 * max_waiting)))

        results = asyncio.run(burst())
        statuses = [st for st, _, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        assert 429 in statuses and 200 in statuses, statuses
        for st, retry, chunks in results:
            if st == 429:
                assert retry is not None and int(retry) >= 1
            else:
                assert chunks == 100 + 1, "a served stream ends with its 100 tokens and [DONE]"
        _assert_nothing_leaked(s)


def test_clients_killed_mid_stream_leak_nothing(tiny, start_server) -> None:
    clients, names = 56, sorted(tiny[1])
    with start_server(*tiny, **LONG_CONTEXT) as s:
        before = _aborted(s)

        async def kill_all() -> list[int]:
            return await asyncio.gather(*(_first_chunk_then(s.url, _body(names[i % len(names)]), None)
                                          for i in range(clients)))

        assert asyncio.run(kill_all()) == [200] * clients
        m = _assert_nothing_leaked(s)
        aborted = _aborted(s) - before
        assert aborted == clients, f"{aborted} of {clients} dropped streams were aborted"
        assert m["lorascope:adapters_resident"]  # the server still answers with its full state
        with s.client() as c:
            r = c.post("/v1/completions", json=_body(names[0], 4, stream=False))
            assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 4


def _aborted(server) -> float:
    samples = server.metrics().get("lorascope:requests_finished_total", [])
    return sum(v for labels, v in samples if labels.get("finish_reason") == "abort")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_and_completion_count_tokens_in_metrics(server, stream: bool) -> None:
    def generated() -> float:
        return sum(v for _, v in server.metrics().get("lorascope:generation_tokens_total", []))

    before = generated()
    with server.client() as c:
        r = c.post("/v1/completions", json=_body(server.served, 5, stream))
        assert r.status_code == 200
        if not stream:
            assert json.loads(r.text)["usage"]["completion_tokens"] == 5
    assert generated() - before == 5
