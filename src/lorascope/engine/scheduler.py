"""Scheduler: which requests run this step, and how many of their tokens (continuous batching with
chunked prefill under one token budget, vLLM v1 style).

Each step: the policy plans the step's adapters (`fair` swaps adapters in and out of the device
slots; `vllm` does nothing here); running requests go first (a decode token each, or their next
prefill chunk), preempting the newest running request (recompute) when KV blocks run out; a running
request whose adapter is not ready in a slot this step is *parked* (it keeps its seat and KV blocks
and is simply not scheduled); then the admission policy picks waiting requests. A request is
scheduled only when its adapter is ready in a device slot; loads are started here but run beside
the step (adapters/cache.py). Policies live in policies.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorascope.adapters.cache import AdapterCache
from lorascope.config import EngineConfig
from lorascope.engine.kv_cache import BlockManager
from lorascope.engine.request import Request, Status


@dataclass(slots=True)
class SchedulerOutput:
    step: int
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # finished with an error while scheduling
    skipped: int = 0  # admissions passed over by the max_loras rule this step
    parked: int = 0  # running requests not scheduled because their adapter has no slot this step

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def adapters(self) -> set[str]:
        return {r.adapter for r, _ in self.scheduled if r.adapter is not None}


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, cache: AdapterCache | None):
        from lorascope.engine.policies import make_admission_policy

        self.cfg = cfg
        self.blocks = blocks
        self.cache = cache
        self.waiting: list[Request] = []  # arrival order; preempted requests go back to the front
        self.running: list[Request] = []  # admission order
        self.last_run: dict[Request, int] = {}  # running request -> the last step it was scheduled in
        self.step = 0
        self.policy = make_admission_policy(cfg)

    # --- lifecycle ----------------------------------------------------------------------

    def add(self, req: Request) -> None:
        req.arrival_step = self.step
        req.status = Status.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.last_run.pop(req, None)
            self._release(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self.step += 1
        out = SchedulerOutput(self.step)
        if self.cache is not None:
            self.cache.poll()
            self.cache.begin_step()
            out.failed = self._fail_unloadable()
        self.policy.plan(self)
        budget = self.cfg.max_num_batched_tokens
        for req in list(self.running):
            if req.status is not Status.RUNNING or budget == 0:
                continue
            if not self.adapter_ready(req):  # parked: its adapter has no slot this step
                out.parked += 1
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._make_room(req, req.num_computed + n, out):
                continue
            self._schedule(req, n, out)
            budget -= n
        if not out.preempted:  # as vLLM: no admissions in a step that had to preempt
            self.policy.admit(self, out, budget)
        return out

    def _make_room(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running requests until `req` fits; False if `req` itself went."""
        while not self.blocks.can_allocate(req, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _schedule(self, req: Request, n: int, out: SchedulerOutput) -> None:
        self.blocks.allocate(req, req.num_computed + n)
        if req.adapter is not None:
            assert self.cache is not None
            self.cache.use(req.adapter)
        self.last_run[req] = self.step
        out.scheduled.append((req, n))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.last_run.pop(req, None)
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        req.preemptions += 1
        self.waiting.insert(0, req)
        out.preempted.append(req)
        for i, (r, _) in enumerate(out.scheduled):
            if r is req:
                del out.scheduled[i]
                break

    def _release(self, req: Request) -> None:
        self.blocks.free(req)
        if req.adapter is not None and self.cache is not None:
            self.cache.release(req.adapter)

    def _fail_unloadable(self) -> list[Request]:
        assert self.cache is not None
        if not self.cache.failed:
            return []
        failed = [r for r in (*self.running, *self.waiting) if r.adapter in self.cache.failed]  # running: a swap-in failed
        for req in failed:
            req.error = f"adapter {req.adapter!r} could not be loaded: {self.cache.failed[req.adapter]}"
            self.finish(req, "error")
        return failed

    # --- helpers for policies ------------------------------------------------------------

    def adapter_ready(self, req: Request) -> bool:
        return req.adapter is None or (self.cache is not None and self.cache.is_ready(req.adapter))

    def first_chunk(self, req: Request, budget: int) -> int:
        return min(req.num_tokens - req.num_computed, budget)

    def can_admit(self, req: Request, budget: int) -> bool:
        """A seat, budget, blocks for its first chunk, and its adapter ready."""
        if len(self.running) >= self.cfg.max_num_seqs or budget <= 0 or not self.adapter_ready(req):
            return False
        return self.blocks.can_allocate(req, req.num_computed + self.first_chunk(req, budget))

    def admit(self, req: Request, out: SchedulerOutput, budget: int) -> int:
        """Move `req` to running and schedule its first chunk; returns the tokens used."""
        n = self.first_chunk(req, budget)
        if req.adapter is not None:
            assert self.cache is not None
            self.cache.acquire(req.adapter)
        self.waiting.remove(req)
        self.running.append(req)
        req.status = Status.RUNNING
        if req.admitted_step is None:
            req.admitted_step = self.step
        self._schedule(req, n, out)
        return n
