"""AsyncLLMEngine: the engine on its own thread, driven from asyncio.

The engine is single-threaded: every call into it (add, abort, runtime adapter load/unload) runs
on the engine thread as a command; the loop there alternates draining commands and `step()`.
New tokens reach each caller through an asyncio queue fed with `call_soon_threadsafe`. A caller
that goes away (client disconnect -> task cancelled) aborts its request, which frees its KV blocks
and its adapter reference at once.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorascope.adapters.peft import AdapterError
from lorascope.adapters.source import AdapterSource, DirectorySource
from lorascope.config import EngineConfig
from lorascope.engine.engine import LLMEngine, StepRecord
from lorascope.engine.request import Request
from lorascope.engine.sampling import SamplingParams

T = TypeVar("T")


_SWITCH_INTERVAL_S = 0.0005


class OverloadedError(RuntimeError):
    """More requests are waiting than `max_waiting` allows; retry after `retry_after_s`."""

    def __init__(self, waiting: int, limit: int, retry_after_s: float = 1.0):
        super().__init__(f"{waiting} requests are waiting (limit {limit}); retry later")
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class Delta:
    """What one step added to one request (the last delta has `finished` set)."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Snapshot:
    """A consistent copy of the engine's state, taken on the engine thread (for /metrics)."""

    waiting_adapters: list[str]
    running_adapters: list[str]
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    device_resident: list[str]
    host_resident: list[str]
    cache: dict[str, Any]
    max_loras: int
    adapter_refs: int
    memory_bytes: dict[str, int]  # weights, kv_cache, adapter_slots (allocated), host_tier (held now)


class AsyncLLMEngine:
    def __init__(
        self,
        cfg: EngineConfig,
        adapters: Path | str | dict[str, Path] | AdapterSource | None = None,
        max_waiting: int | None = None,
    ):
        self.engine = LLMEngine(cfg, adapters)
        self.cfg = cfg
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delta]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.step_hooks: list[Callable[[StepRecord], None]] = []
        self.finish_hooks: list[Callable[[Request], None]] = []
        self.error: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        # The engine thread shares the GIL with the event loop's thread (clients, HTTP) and the adapter
        # loader threads; at Python's default 5 ms switch interval a ready thread can wait that long
        # for the GIL. A serving process runs one engine: lower the interval for it (never raise it).
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorascope-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # --- the API --------------------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream a request's tokens. Raises input errors (ValueError) and OverloadedError before the
        first delta; cancelling the consumer aborts the request. A consumer that falls behind the
        engine gets the steps it missed as one delta (their tokens in order, the last one's status):
        a server pays its per-chunk cost (a socket write through the ASGI stack, ~0.3 ms on cpu2)
        once per read instead of once per step, so a busy event loop catches up instead of taking
        the GIL from the engine thread for every token."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()

        def add() -> str:
            waiting = len(self.engine.scheduler.waiting)
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise OverloadedError(waiting, self.max_waiting)
            req = self.engine.add_request(prompt, params, adapter, rid)
            self._streams[req.request_id] = (loop, deltas)
            return req.request_id

        # The id is fixed before the engine thread may register it, so a caller cancelled while
        # `add` runs still aborts it (aborting an id the engine does not know does nothing).
        rid = request_id or f"req-{uuid.uuid4().hex}"
        finished = False
        try:
            try:
                await self._call(add)
            except Exception:
                finished = True  # `add` refused it: nothing was registered (and rid may be someone else's)
                raise
            while not finished:
                delta = await deltas.get()
                while not delta.finished and not deltas.empty():
                    delta = _merge(delta, deltas.get_nowait())
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self._submit(lambda: self._abort(rid))

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self._abort(request_id))

    async def load_adapter(self, name: str, path: Path) -> None:
        """Register an adapter at runtime after validating it (a bad directory raises AdapterError)."""
        source = self._directory_source()

        def load() -> None:
            from lorascope.adapters.peft import read_peft_adapter

            if source.has(name):
                raise AdapterError(f"adapter {name!r} is already loaded; unload it first or pick another name")
            read_peft_adapter(path, self.engine.model_cfg, self.cfg.max_lora_rank, name=name)  # validate now
            source.add(name, path)

        await self._call(load)

    async def unload_adapter(self, name: str) -> None:
        source = self._directory_source()

        def unload() -> None:
            if not source.has(name):
                raise AdapterError(f"adapter {name!r} is not loaded")
            busy = [r for r in self.engine.requests.values() if r.adapter == name]
            if busy:
                raise AdapterError(f"adapter {name!r} has {len(busy)} requests in flight; retry when they finish")
            self.engine.cache.forget(name)
            source.remove(name)

        await self._call(unload)

    async def snapshot(self) -> Snapshot:
        return await self._call(self._snapshot)

    def adapter_names(self) -> list[str]:
        return self.engine.source.names()

    # --- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if self.engine.has_unfinished():
                    steps_before = len(self.engine.steps)
                    progressed = self.engine.step()
                    if len(self.engine.steps) > steps_before:
                        for hook in self.step_hooks:
                            hook(self.engine.steps[-1])
                    self._publish(progressed)
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # the engine is broken: fail every stream rather than hang them
            self.error = e
            for rid in list(self._streams):
                self._send(rid, Delta(rid, [], True, "error", f"engine failed: {e!r}"))
            raise

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _publish(self, progressed: list[Request]) -> None:
        """One step's deltas, delivered with one wake-up per event loop (not one per request: each
        call_soon_threadsafe writes the loop's self-pipe, and the loop's thread then competes with the
        engine thread for the GIL once per request)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = {}
        for req in progressed:
            resolved = req.num_resolved  # pipelined steps: later ids may still be on the device
            new = req.output_ids[req.num_reported : resolved]
            req.num_reported = resolved
            delta = Delta(req.request_id, new, req.finished, req.finish_reason, req.error, len(req.prompt_ids), resolved)
            if req.finished:
                for hook in self.finish_hooks:
                    hook(req)
            target = self._streams.get(req.request_id)
            if target is not None:
                batches.setdefault(target[0], []).append((target[1], delta))
            if req.finished:
                self._streams.pop(req.request_id, None)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _send(self, rid: str, delta: Delta) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, deltas = target
            loop.call_soon_threadsafe(deltas.put_nowait, delta)

    def _abort(self, rid: str) -> None:
        self._streams.pop(rid, None)
        req = self.engine.requests.get(rid)
        self.engine.abort(rid)
        if req is not None:
            for hook in self.finish_hooks:
                hook(req)

    def _snapshot(self) -> Snapshot:
        eng = self.engine
        return Snapshot(
            waiting_adapters=sorted({r.adapter for r in eng.scheduler.waiting if r.adapter}),
            running_adapters=sorted({r.adapter for r in eng.scheduler.running if r.adapter}),
            num_waiting=len(eng.scheduler.waiting),
            num_running=len(eng.scheduler.running),
            kv_blocks_used=eng.blocks.num_used,
            kv_blocks_total=eng.blocks.num_blocks,
            device_resident=sorted(eng.cache.resident),
            host_resident=sorted(eng.cache.host),
            cache=eng.cache.stats(),
            max_loras=self.cfg.max_loras,
            adapter_refs=sum(eng.cache.refs.values()),
            memory_bytes=eng.memory_bytes(),
        )

    # --- commands -------------------------------------------------------------------------------

    def _submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        self._commands.put(run)
        self._wake.set()
        return future

    async def _call(self, fn: Callable[[], T]) -> T:
        if not self.alive:
            raise RuntimeError(f"the engine is not running{f': {self.error!r}' if self.error else ''}")
        return await asyncio.wrap_future(self._submit(fn))

    def _directory_source(self) -> DirectorySource:
        source = self.engine.source
        if not isinstance(source, DirectorySource):
            raise AdapterError(f"runtime loading needs a directory adapter source, not {type(source).__name__}")
        return source


def _merge(first: Delta, later: Delta) -> Delta:
    """Two consecutive deltas of one request as one: both steps' tokens, the later one's status."""
    return Delta(first.request_id, first.token_ids + later.token_ids, later.finished, later.finish_reason, later.error,
                 later.prompt_tokens, later.completion_tokens)


def _deliver(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for deltas, delta in items:
        deltas.put_nowait(delta)
