"""The client: one asyncio process, aiohttp streaming, one `RequestRecord` per request.

Times are stamped as chunks are read, on one monotonic clock measured from the cell's start (t0).
Each request keeps its *intended* send time (open loop) beside the *actual* one, so client lag and
coordinated omission show. Output tokens come from the server's `usage` (requested with
`stream_options.include_usage`), with the client's own count kept beside them: one token per
chunk that carries a choice, or `len(token_ids)` where the server returns token ids.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from lorascope.results.records import RequestRecord


@dataclass(slots=True)
class ClientRequest:
    index: int
    model: str  # the served name: the base model or an adapter
    adapter: str | None  # what the record says (None: base model)
    prompt_token_ids: list[int]
    max_tokens: int
    intended_send_s: float | None = None  # None: closed loop
    warmup: bool = False


@dataclass(slots=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:8000
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True  # exact output lengths (vLLM's extension; OpenAI servers may ignore it)


def completion_body(req: ClientRequest, target: Target) -> dict[str, object]:
    body: dict[str, object] = {
        "model": req.model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": req.max_tokens}
    return body


async def send(
    session: aiohttp.ClientSession, target: Target, req: ClientRequest, t0: float, cell_id: str, repetition: int
) -> RequestRecord:
    """Send one streaming completion and record it; never raises for HTTP or stream failures."""
    rec = RequestRecord(
        cell_id=cell_id, repetition=repetition, index=req.index, adapter=req.adapter, warmup=req.warmup,
        intended_send_s=req.intended_send_s, actual_send_s=time.monotonic() - t0,
        client_prompt_tokens=len(req.prompt_token_ids),
    )
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        async with session.post(
            f"{target.base_url}/v1/completions", json=completion_body(req, target), headers=headers,
            timeout=aiohttp.ClientTimeout(total=target.timeout_s),
        ) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                rec.status = "refused" if resp.status == 429 else "error"
                rec.error = (await resp.text())[:500]
                rec.end_s = time.monotonic() - t0
                return rec
            await _read_stream(resp, rec, t0)
    except TimeoutError:
        rec.status, rec.error = "timeout", f"no complete response within {target.timeout_s} s"
    except (aiohttp.ClientError, ValueError) as e:
        rec.status, rec.error = "error", f"{type(e).__name__}: {e}"[:500]
    rec.end_s = time.monotonic() - t0
    return rec


async def _read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, t0: float) -> None:
    buffer = b""
    async for piece in resp.content.iter_any():
        now = time.monotonic() - t0
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    _on_data(line[5:].strip(), rec, now)
    if rec.first_token_s is None and rec.status == "ok":
        rec.status, rec.error = "error", "the stream ended without a token"


def _on_data(data: bytes, rec: RequestRecord, now: float) -> None:
    if data == b"[DONE]":
        return
    chunk = json.loads(data)
    if "error" in chunk:
        rec.status, rec.error = "error", json.dumps(chunk["error"])[:500]
        return
    usage = chunk.get("usage")
    if usage:
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.output_tokens = usage.get("completion_tokens")
    choices = chunk.get("choices") or []
    if not choices:
        return
    ids = choices[0].get("token_ids")
    tokens = len(ids) if isinstance(ids, list) else 1
    if tokens == 0:
        return
    if rec.first_token_s is None:
        rec.first_token_s = now
    rec.chunk_times_s.append(now)
    rec.chunk_tokens.append(tokens)
    rec.client_output_tokens += tokens


class LagProbe:
    """Measures the event loop's own lag: how late a 10 ms sleep wakes up. Reported with every
    cell, it says whether the load generator itself was the bottleneck."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.interval_s)
            self.lags_s.append(max(0.0, time.monotonic() - start - self.interval_s))

    def __enter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary_ms(self) -> dict[str, float]:
        if not self.lags_s:
            return {"loop_lag_p50_ms": 0.0, "loop_lag_p99_ms": 0.0, "loop_lag_max_ms": 0.0}
        ordered = sorted(self.lags_s)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
        return {"loop_lag_p50_ms": pick(0.5), "loop_lag_p99_ms": pick(0.99), "loop_lag_max_ms": ordered[-1] * 1e3}


async def run_cell(
    target: Target,
    requests: list[ClientRequest],
    cell_id: str,
    repetition: int,
    concurrency: int | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], dict[str, float]]:
    """Closed loop (`concurrency` in flight) or open loop (each request at its intended send time).

    `on_done` is called with each record as its request ends (a progress bar, say). Returns the
    records in request order and the client's own lag/overhead figures."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        with LagProbe() as probe:
            t0 = time.monotonic()
            def sent(req: ClientRequest) -> Awaitable[RequestRecord]:
                return _send_and_report(session, target, req, t0, cell_id, repetition, on_done)

            if concurrency is not None:
                records = await _closed_loop(sent, requests, concurrency)
            else:
                records = await _open_loop(sent, requests, t0)
    sends = [r.actual_send_s - r.intended_send_s for r in records if r.intended_send_s is not None]
    overhead = probe.summary_ms()
    overhead["send_lag_max_ms"] = max(sends, default=0.0) * 1e3
    overhead["send_lag_mean_ms"] = (sum(sends) / len(sends) * 1e3) if sends else 0.0
    return sorted(records, key=lambda r: r.index), overhead


async def _send_and_report(session, target, req, t0, cell_id, repetition, on_done) -> RequestRecord:
    record = await send(session, target, req, t0, cell_id, repetition)
    if on_done is not None:
        on_done(record)
    return record


async def _closed_loop(
    sent: Callable[[ClientRequest], Awaitable[RequestRecord]], requests: list[ClientRequest], concurrency: int
) -> list[RequestRecord]:
    queue: asyncio.Queue[ClientRequest] = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)
    records: list[RequestRecord] = []

    async def worker() -> None:
        while not queue.empty():
            records.append(await sent(queue.get_nowait()))

    await asyncio.gather(*[worker() for _ in range(min(concurrency, len(requests)))])
    return records


async def _open_loop(
    sent: Callable[[ClientRequest], Awaitable[RequestRecord]], requests: list[ClientRequest], t0: float
) -> list[RequestRecord]:
    async def timed(req: ClientRequest) -> RequestRecord:
        delay = (req.intended_send_s or 0.0) - (time.monotonic() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        return await sent(req)

    return list(await asyncio.gather(*[timed(r) for r in requests]))
