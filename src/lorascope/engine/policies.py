"""Admission policies: which waiting requests join the running batch this step.

`vllm` reproduces vLLM's rule: first come first served, at most `max_loras` distinct adapters in
the running set; a waiting request whose adapter is not in that set is *skipped* while the set is
full, and requests behind it may go first. A cold adapter that gets a place is loaded (beside the
step, unlike vLLM, which loads inside it) and counts against the cap while it loads.

`fair` (default) bounds every request's wait:
1. Requests that have waited `fair_max_wait_steps` steps or more are *overdue*; they go first, in
   arrival order. One that lacks only a device slot gets one by *draining* a single resident
   adapter: the one with the fewest running requests (it frees soonest) takes no new requests
   until its slot is free, then the overdue request's adapter loads there. Every other resident
   adapter keeps admitting, so the batch stays full (draining the whole batch for every overdue
   request, this policy's first version, lost up to half the throughput at low max_loras:
   benchmarks/RESULTS.md). One that lacks a seat or KV blocks pauses all admissions until
   running requests free them. Either way its remaining wait is bounded by work already running
   or ahead of it, never by later arrivals: a draining adapter admits nothing new.
2. Otherwise adapters are grouped to keep the working set small: requests whose adapter is
   resident go first (in arrival order), then the others grouped by adapter, oldest group first;
   their adapters are loaded into free slots or in place of resident adapters nobody waits for.
3. Adapters of the next `prefetch_lookahead` queued requests are prefetched into the host tier.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Protocol

from lorascope.config import EngineConfig
from lorascope.engine.request import Request, Status

if TYPE_CHECKING:
    from lorascope.engine.scheduler import Scheduler, SchedulerOutput


class AdmissionPolicy(Protocol):
    def admit(self, s: Scheduler, out: SchedulerOutput, budget: int) -> None: ...


class VLLMPolicy:
    def __init__(self, cfg: EngineConfig):
        self.max_loras = cfg.max_loras
        self._reserved: dict[str, Request] = {}  # adapter -> the waiting request it loads for

    def admit(self, s: Scheduler, out: SchedulerOutput, budget: int) -> None:
        self._reserved = {a: r for a, r in self._reserved.items() if r.status is Status.WAITING}
        loras = {r.adapter for r in s.running if r.adapter is not None} | set(self._reserved)
        for req in list(s.waiting):
            if len(s.running) >= s.cfg.max_num_seqs or budget <= 0:
                break
            adapter = req.adapter
            if adapter is not None and adapter not in loras and len(loras) >= self.max_loras:
                req.skipped += 1
                out.skipped += 1
                continue
            if not s.adapter_ready(req):
                assert adapter is not None and s.cache is not None
                if s.cache.request_load(adapter, protected=loras):
                    loras.add(adapter)
                    self._reserved.setdefault(adapter, req)
                continue
            if not s.can_admit(req, budget):
                break  # out of KV blocks: wait for running requests to finish, as vLLM does
            budget -= s.admit(req, out, budget)
            if adapter is not None:
                loras.add(adapter)
                self._reserved.pop(adapter, None)


class FairPolicy:
    def __init__(self, cfg: EngineConfig):
        self.max_wait_steps = cfg.fair_max_wait_steps
        self.lookahead = cfg.prefetch_lookahead

    def admit(self, s: Scheduler, out: SchedulerOutput, budget: int) -> None:
        overdue = [r for r in s.waiting if s.step - r.arrival_step >= self.max_wait_steps]
        seats, blocks = 0, 0  # held back for overdue requests whose adapter is loading or waits for a slot
        draining: set[str] = set()  # resident adapters that take no new request: their slots go to overdue ones
        keep = {r.adapter for r in overdue if r.adapter is not None}  # never drain what an overdue request needs
        slot_for: set[str] = set()  # adapters a slot is already being drained for (one slot each)
        for req in overdue:
            chunk = s.first_chunk(req, budget)
            need = s.blocks.blocks_needed(req, req.num_computed + chunk)
            room = len(s.running) + seats < s.cfg.max_num_seqs and need + blocks <= s.blocks.num_free and budget > 0
            if not room:  # a seat or KV blocks: pause admissions until running requests free them
                self._prefetch(s)
                return
            if s.adapter_ready(req):
                budget -= s.admit(req, out, budget)
                continue
            assert req.adapter is not None and s.cache is not None
            if not s.cache.request_load(req.adapter, protected=keep - {req.adapter}) and req.adapter not in slot_for:
                victim = self._drain_victim(s, keep | draining)
                if victim is not None:
                    draining.add(victim)
                    slot_for.add(req.adapter)
            seats, blocks, budget = seats + 1, blocks + need, budget - chunk
        self._admit_grouped(s, out, budget, seats, blocks, draining)
        self._prefetch(s)

    @staticmethod
    def _drain_victim(s: Scheduler, exclude: set[str]) -> str | None:
        """The resident adapter whose slot frees soonest: the fewest running requests (ties: name)."""
        running = Counter(r.adapter for r in s.running if r.adapter is not None)
        cache = s.cache
        candidates = [a for a in running if a not in exclude and cache is not None and cache.is_ready(a)]
        return min(candidates, key=lambda a: (running[a], a)) if candidates else None

    def _admit_grouped(self, s: Scheduler, out: SchedulerOutput, budget: int, seats: int, blocks: int,
                       draining: set[str]) -> None:
        cache = s.cache
        oldest: dict[str | None, int] = {}
        for i, r in enumerate(s.waiting):
            oldest.setdefault(r.adapter, i)
        order = sorted(range(len(s.waiting)), key=lambda i: (not s.adapter_ready(s.waiting[i]), oldest[s.waiting[i].adapter], i))
        candidates = [s.waiting[i] for i in order if s.waiting[i].adapter not in draining
                      and s.step - s.waiting[i].arrival_step < self.max_wait_steps]  # overdue ones: admit() above
        wanted = {r.adapter for r in candidates if r.adapter is not None and s.adapter_ready(r)}
        for req in candidates:
            if len(s.running) + seats >= s.cfg.max_num_seqs or budget <= 0:
                break
            if s.adapter_ready(req):
                need = s.blocks.blocks_needed(req, req.num_computed + s.first_chunk(req, budget))
                if need + blocks > s.blocks.num_free:
                    break
                budget -= s.admit(req, out, budget)
            elif not draining:  # while a slot drains for an overdue request, no other cold adapter loads
                assert cache is not None and req.adapter is not None
                if not cache.is_loading(req.adapter) and cache.request_load(req.adapter, protected=wanted):
                    wanted.add(req.adapter)

    def _prefetch(self, s: Scheduler) -> None:
        """Read the next queued adapters into the host tier, no more of them than the tier has room
        for beside the device-resident ones: more would evict each other before use (thrash)."""
        cache = s.cache
        if cache is None:
            return
        room = cache.max_cpu_loras - len(cache.resident)
        chosen: set[str] = set()
        for req in s.waiting[: self.lookahead]:
            name = req.adapter
            if name is None or name in chosen or cache.is_ready(name) or cache.is_loading(name):
                continue
            if len(chosen) >= room:
                break
            chosen.add(name)
            cache.prefetch_host(name)


def make_admission_policy(cfg: EngineConfig) -> AdmissionPolicy:
    return VLLMPolicy(cfg) if cfg.policy == "vllm" else FairPolicy(cfg)
