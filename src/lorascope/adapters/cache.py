"""The tiered adapter cache: disk (an AdapterSource) -> host LRU (`max_cpu_loras`) -> device slots
(`max_loras`).

Loads run on a thread pool beside the engine's step, never inside it: the scheduler asks for a
load, keeps the request waiting, and schedules it once the adapter is `ready`. A slot being filled
is read by no step: a step schedules only requests whose adapter is ready, and the slots of the
adapters a step uses (`use`, cleared by `begin_step`) are never evicted until the next step.
Running requests hold references (`acquire` / `release`). Without `time_sliced` (the `vllm`
policy) a referenced adapter keeps its device slot until its last running request finishes. With
it (the `fair` policy) device slots are a per-step resource: a referenced adapter that the current
step does not use may lose its slot (its running requests are parked until it is loaded again),
but it never leaves the host tier, so swapping it back in is a host->device copy. The host tier
holds `max_cpu_loras` adapters, more while running requests need more (at most one per running
request).

Counters, per tier: a *hit* is a lookup that finds the adapter resident, a *miss* one that must
load it; *loads* and *load_seconds* count completed loads into the tier (disk->host reads,
host->device copies); *evictions* count adapters pushed out to make room.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import torch

from lorascope.adapters.policy import make_policy
from lorascope.adapters.source import AdapterSource
from lorascope.model.config import ModelConfig
from lorascope.model.lora import HostAdapter, LoRASlotStore


@dataclass(slots=True)
class TierCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class AdapterCache:
    def __init__(
        self,
        source: AdapterSource,
        cfg: ModelConfig,
        store: LoRASlotStore,
        max_cpu_loras: int,
        eviction: str = "lru",
        dtype: torch.dtype = torch.float32,
        threads: int = 2,
        time_sliced: bool = False,
    ):
        self.source, self.cfg, self.store, self.dtype = source, cfg, store, dtype
        self.max_cpu_loras = max_cpu_loras
        self.time_sliced = time_sliced
        self.on_cuda = any(t.is_cuda for t in store.a.values())
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lora-load")
        self._copy_stream = torch.cuda.Stream() if self.on_cuda else None
        self._lock = threading.Lock()  # guards the host tier, touched by loader threads
        self.host: dict[str, HostAdapter] = {}
        self._host_policy = make_policy(eviction)
        self._host_loading: dict[str, Future[HostAdapter]] = {}
        # device tier: touched by the engine thread only
        self.slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * store.max_loras
        self._device_policy = make_policy(eviction)
        self._ready: set[str] = set()
        self._loading: dict[str, Future[None]] = {}
        self._fresh: set[str] = set()  # loaded for a request that has not acquired it yet
        self.refs: Counter[str] = Counter()  # running requests per adapter (read by loader threads: copy first)
        self._in_step: set[str] = set()  # adapters the current step reads: their slots stay until the next step
        # per slot, the CUDA event recorded after the launches of the last step that read it: a load into
        # the slot waits for that step's kernels only, not for everything queued on the compute stream
        self._slot_read: list[torch.cuda.Event | None] = [None] * store.max_loras
        # LORASCOPE_LOAD_WAITS_FOR_STREAM=1: the old rule (wait for the whole compute stream), for A/B runs
        self._wait_whole_stream = os.environ.get("LORASCOPE_LOAD_WAITS_FOR_STREAM") == "1"
        self.failed: dict[str, str] = {}
        self.host_counters = TierCounters()
        self.device_counters = TierCounters()

    # --- what the scheduler asks -----------------------------------------------------------

    def is_ready(self, name: str) -> bool:
        return name in self._ready

    def is_loading(self, name: str) -> bool:
        return name in self._loading

    @property
    def resident(self) -> set[str]:
        return set(self._ready)

    @property
    def free_slots(self) -> int:
        return sum(owner is None for owner in self._owner)

    def evictable(self, protected: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Ready adapters whose slot may be taken: not used by this step, not `protected`, and (unless
        time-sliced) referenced by no running request."""
        return [n for n in self._ready if n not in self._in_step and n not in protected
                and (self.time_sliced or self.refs[n] == 0)]

    def request_load(self, name: str, protected: set[str] | frozenset[str] = frozenset()) -> bool:
        """Start loading `name` into a device slot unless it is there or on its way.

        Takes a free slot, else evicts an unreferenced adapter not in `protected`. Returns False
        when no slot can be had now (every slot is in use or protected).
        """
        if name in self._ready or name in self._loading:
            return True
        if name in self.failed:
            return False
        slot = next((i for i, owner in enumerate(self._owner) if owner is None), None)
        if slot is None:
            victim = self._device_policy.select_victim(self.evictable(protected))
            if victim is None:
                return False
            slot = self._evict(victim)
        self._owner[slot] = name
        self.slot_of[name] = slot
        self.device_counters.misses += 1
        self._loading[name] = self._pool.submit(self._load_into_slot, name, slot, self._slot_read[slot])
        return True

    def prefetch_host(self, name: str) -> None:
        """Read an adapter into the host tier ahead of need (no device slot is taken)."""
        with self._lock:
            if name in self.host or name in self._host_loading or name in self.failed:
                return
            self._host_loading[name] = self._pool.submit(self._host_get, name, False)

    def poll(self) -> list[str]:
        """Settle finished loads; returns the names that became ready."""
        became_ready = []
        for name, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[name]
            error = future.exception()
            if error is None:
                self._ready.add(name)
                self._fresh.add(name)
                self._device_policy.mark_used(name)
                became_ready.append(name)
            else:
                self.failed[name] = str(error)
                self._free_slot(name)
        return became_ready

    def wait_for_loads(self, timeout_s: float) -> None:
        if self._loading:
            wait(list(self._loading.values()), timeout=timeout_s, return_when=FIRST_COMPLETED)

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until every load started so far has finished (tests that must not depend on how
        fast the loader threads run; warm-up). `poll` still has to be called to see them ready."""
        pending = list(self._loading.values())
        if pending:
            wait(pending, timeout=timeout_s)

    def begin_step(self) -> None:
        """A new step starts: no slot is in use until `use` says so."""
        self._in_step.clear()

    def step_launched(self) -> None:
        """The current step's kernels are queued (CUDA): mark its slots as read up to this point, so a
        later load into one of them (after an eviction) waits for exactly these kernels."""
        if self.on_cuda and self._in_step:
            event = torch.cuda.Event()
            event.record()
            for name in self._in_step:
                self._slot_read[self.slot_of[name]] = event

    def use(self, name: str) -> None:
        """The current step reads `name`'s slot (it must be ready): the slot stays until the next step."""
        if name not in self._ready:
            raise RuntimeError(f"adapter {name!r} scheduled before it was ready")
        self._in_step.add(name)

    def acquire(self, name: str) -> int:
        """A running request starts using `name` (which must be ready); returns its slot."""
        if name not in self._ready:
            raise RuntimeError(f"adapter {name!r} acquired before it was ready")
        if name in self._fresh:
            self._fresh.discard(name)
        else:
            self.device_counters.hits += 1
        self.refs[name] += 1
        self._device_policy.mark_used(name)
        return self.slot_of[name]

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if self.refs[name] <= 0:
            del self.refs[name]

    def forget(self, name: str) -> None:
        """Drop an adapter from every tier (runtime unload). It must have no running request."""
        if self.refs[name]:
            raise RuntimeError(f"adapter {name!r} is in use by {self.refs[name]} running requests")
        if name in self._loading:
            self._loading.pop(name).result()
            self._ready.add(name)
        if name in self._ready:
            self._ready.discard(name)
            self._fresh.discard(name)
            self._free_slot(name)
        with self._lock:
            self.host.pop(name, None)
            self._host_policy.remove(name)
        self.failed.pop(name, None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def stats(self) -> dict[str, object]:
        return {
            "device": asdict(self.device_counters),
            "host": asdict(self.host_counters),
            "device_resident": len(self._ready),
            "device_loading": len(self._loading),
            "host_resident": len(self.host),
            "referenced": sum(self.refs.values()),
        }

    # --- internals ------------------------------------------------------------------------

    def _evict(self, name: str) -> int:
        self._ready.discard(name)
        self._fresh.discard(name)
        self.device_counters.evictions += 1
        return self._free_slot(name)

    def _free_slot(self, name: str) -> int:
        slot = self.slot_of.pop(name)
        self._owner[slot] = None
        self._device_policy.remove(name)
        self.store.clear(slot)
        return slot

    def _load_into_slot(self, name: str, slot: int, read_by: torch.cuda.Event | None = None) -> None:
        host = self._host_get(name, True)
        start = time.perf_counter()
        if self._copy_stream is not None:
            # the slot may have been read by a step whose kernels are still running (pipelined steps run
            # ahead of the host): the copy waits for the last step that read it (`read_by`, recorded by
            # step_launched), not for the whole compute stream, which holds up to two steps of other work
            if self._wait_whole_stream:
                self._copy_stream.wait_stream(torch.cuda.default_stream(self._copy_stream.device))
            elif read_by is not None:
                self._copy_stream.wait_event(read_by)
            with torch.cuda.stream(self._copy_stream):
                self.store.write(slot, host, non_blocking=True)
            self._copy_stream.synchronize()
        else:
            self.store.write(slot, host)
        with self._lock:
            self.device_counters.load_seconds += time.perf_counter() - start
            self.device_counters.loads += 1

    def _host_get(self, name: str, count_lookup: bool) -> HostAdapter:
        with self._lock:
            adapter = self.host.get(name)
            if adapter is not None:
                self._host_policy.mark_used(name)
                if count_lookup:
                    self.host_counters.hits += 1
                return adapter
            pending = self._host_loading.get(name) if count_lookup else None
            if count_lookup:
                self.host_counters.misses += 1
        if pending is not None:  # a prefetch is already reading it
            return pending.result()
        start = time.perf_counter()
        try:
            adapter = self.source.load(name, self.cfg, self.store.max_rank, self.dtype)
            if self.on_cuda and not _pinned(adapter):  # a synthetic source hands out views of one pinned buffer
                adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        finally:
            with self._lock:
                self._host_loading.pop(name, None)
        with self._lock:
            self.host_counters.load_seconds += time.perf_counter() - start
            self.host_counters.loads += 1
            self._insert_host(name, adapter)
        return adapter

    def _insert_host(self, name: str, adapter: HostAdapter) -> None:
        while len(self.host) >= self.max_cpu_loras:
            # keep device-resident adapters on the host while others can go; never drop one that a
            # running request needs (a parked request's adapter is reloaded from here): hold one more
            needed = dict.copy(self.refs).keys()  # dict.copy is atomic under the GIL; the engine thread writes refs
            victim = self._host_policy.select_victim(set(self.host) - self.slot_of.copy().keys() - needed)
            victim = victim or self._host_policy.select_victim(set(self.host) - needed)
            if victim is None:
                break
            del self.host[victim]
            self._host_policy.remove(victim)
            self.host_counters.evictions += 1
        self.host[name] = adapter
        self._host_policy.mark_used(name)



def _pinned(adapter: HostAdapter) -> bool:
    """Whether the source handed out pinned tensors. The sources pin all or nothing (a synthetic
    adapter's tensors are views of one pinned buffer), so one tensor tells: checking or pinning every
    tensor (128 for an 8B q/v adapter) is GIL traffic the engine thread feels."""
    first = next(iter(adapter.weights.values()), None)
    return first is not None and first[0].is_pinned()
