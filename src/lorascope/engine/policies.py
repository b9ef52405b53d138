"""Admission policies: which adapters hold the device slots this step, and which waiting requests
join the running batch.

`vllm` reproduces vLLM's rule: first come first served, at most `max_loras` distinct adapters in
the running set; a waiting request whose adapter is not in that set is *skipped* while the set is
full, and requests behind it may go first. A cold adapter that gets a place is loaded (beside the
step, unlike vLLM, which loads inside it) and counts against the cap while it loads. An adapter
keeps its slot until its last running request finishes.

`fair` (default) time-slices the slots: a slot is a per-step resource, not held for a request's
whole life. Any number of adapters may have running requests; each step only those in the
`max_loras` slots run, and the running requests of the others are *parked* (they keep their seat
and KV blocks and are not scheduled). Before anything is scheduled (`plan`):
0. A slot lent for a request's first step (rule 2) goes back to its adapter once that step ran,
   unless the request it was lent for had a seat and KV blocks but no token budget left in it: then
   the loan stays a step more. (Returning it then lent the slot again later, two loads each time:
   scheduler alone on sweep C's shape, device loads per request fell from ~3-9 to ~1-2 and tokens
   per step at max_loras 8 rose from 0.79-0.86 of vllm's to 0.98-1.00; benchmarks/RESULTS.md.) A
   request waiting for a seat or blocks does not keep a loan: the lender's running requests may be
   the ones that must finish to free them.
1. Free slots, and slots of adapters with no request left, go to the adapters of the oldest
   requests (first come first served, as vLLM does: an adapter keeps its slot while it has
   requests, so its group grows while it waits). Measured (tiny model, Zipf 1.5 over 500, c=32),
   handing slots to the biggest groups instead batches *less*: it starves the long tail, whose
   requests then fill a closed loop's seats.
2. A waiting request not started after `fair_max_wait_steps` (W) steps is overdue: its adapter
   borrows, for one step, the slot of the resident adapter with the fewest requests (one that has
   run since it was loaded and is not itself on loan). The request gets its first chunk (TTFT),
   the slot goes back (rule 0) and the request stays parked until rule 1 or 3 gives it a slot.
3. A running request parked for `fair_max_park_steps` (P) steps is overdue: its adapter takes the
   slot of the resident adapter with the fewest requests among those that have held a slot for
   `fair_quantum_steps` (Q) steps (a loan does not reset that), the longest overdue first.
No rule takes the slot of an adapter while one of its running requests is still in its prompt (a
prompt longer than the step's token budget left runs in several chunks), and a loan is not returned
before that: a started prompt runs to its first token in consecutive steps. (Measured on the H200
before this: with a 256-token budget, requests parked between two chunks of their prompt for up to
P steps, and sweep C's p99 TTFT was 1.5 s.)
Swaps reload from the host tier, which keeps every running request's adapter (adapters/cache.py).
Admission (`admit`): overdue waiting requests whose adapter is ready (a loan's) first, then waiting
requests in arrival order whose adapter is ready; an overdue one whose
adapter is not ready holds a seat and its KV blocks; when an overdue one finds no seat or blocks,
admissions pause until running requests free them. Adapters of the next `prefetch_lookahead`
queued requests are prefetched into the host tier.

Stated bounds (tests/engine/test_policies.py), with L the steps a load takes and k the adapters
overdue no later than the request's own (at most the distinct adapters in flight); a later arrival
is never overdue before it, so neither bound depends on what arrives later:
- a waiting request with a seat starts within W + ceil(k / max_loras) x (2L + 2) + L steps of its
  arrival (a loan occupies a slot for L + 1 steps and its return for L + 1 more, plus one step per
  step whose budget the running requests' prompts took whole), and has its first
  token C - 1 steps after it starts when its prompt runs in C chunks;
- a running request is never parked longer than P + ceil(k / max_loras) x (Q + L) + 2L + 2 steps
  in a row (each slot turns over once per Q + L steps while parked adapters are overdue, plus one
  loan of the slot it gets).
Both bound the TTFT and the longest gap between two tokens in steps.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Protocol

from lorascope.config import EngineConfig
from lorascope.engine.request import Request, Status

if TYPE_CHECKING:
    from lorascope.adapters.cache import AdapterCache
    from lorascope.engine.scheduler import Scheduler, SchedulerOutput


class AdmissionPolicy(Protocol):
    def plan(self, s: Scheduler) -> None: ...  # before the step's running requests are scheduled
    def admit(self, s: Scheduler, out: SchedulerOutput, budget: int) -> None: ...


class VLLMPolicy:
    def __init__(self, cfg: EngineConfig):
        self.max_loras = cfg.max_loras
        self._reserved: dict[str, Request] = {}  # adapter -> the waiting request it loads for

    def plan(self, s: Scheduler) -> None:
        """Nothing: a running request's adapter keeps its slot until the request finishes."""

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
        self.max_park_steps = cfg.fair_max_park_steps
        self.quantum = cfg.fair_quantum_steps
        self.lookahead = cfg.prefetch_lookahead
        self._ready_since: dict[str, int] = {}  # resident adapter -> the first step of its current load
        self._held_since: dict[str, int] = {}  # resident adapter -> since when it holds a slot (a loan does not reset it)
        self._lent: dict[str, tuple[str, int]] = {}  # adapter on a first-step loan -> (lender, lender's held_since)
        self._returning: dict[str, int] = {}  # lender reloading after a loan -> its held_since
        self._keep: set[str] = set()  # this step: adapters whose slot no rule may take (a prompt in progress)
        self._short: set[str] = set()  # last step: adapters of ready overdue requests that had a seat and blocks, not budget

    def plan(self, s: Scheduler) -> None:
        cache = s.cache
        if cache is None:
            return
        step = s.step
        size: Counter[str] = Counter()  # requests per adapter: running (parked or not) and waiting with a seat
        due_at: dict[str, int] = {}  # adapter -> the earliest step one of its requests is overdue from
        oldest: dict[str, int] = {}  # adapter -> arrival step of its oldest request
        first: set[str] = set()  # adapters with an overdue request that has not started yet
        for req in (*s.running, *s.waiting[: max(0, s.cfg.max_num_seqs - len(s.running))]):
            if req.adapter is not None:
                a = req.adapter
                size[a] += 1
                ran = s.last_run.get(req)  # overdue W steps after arrival, or P steps after it last ran
                due = req.arrival_step + self.max_wait_steps if ran is None else ran + self.max_park_steps
                due_at[a] = min(due_at.get(a, due), due)
                oldest[a] = min(oldest.get(a, req.arrival_step), req.arrival_step)
                if ran is None and due <= step:
                    first.add(a)
        # adapters with a running request still in its prompt: their slots stay this step
        self._keep = {r.adapter for r in s.running if r.adapter is not None and not r.output_ids}
        resident = cache.resident
        self._ready_since = {a: self._ready_since.get(a, step) for a in resident}
        self._held_since = {a: self._held_since.get(a, self._returning.pop(a, step)) for a in resident}

        def wanted(a: str) -> bool:
            return a not in resident and not cache.is_loading(a) and a not in cache.failed

        for borrower, (lender, held) in list(self._lent.items()):  # 0. a slot lent for a first step goes back
            if (cache.is_loading(borrower) or self._ready_since.get(borrower) == step or borrower in self._keep
                    or (borrower in first and borrower in self._short)):
                continue  # its step is still to come, or a prompt it started is not through yet, or the
                # request it was lent for had a seat and blocks but no token budget left that step
            del self._lent[borrower]
            back = borrower in resident and wanted(lender) and size[lender] > 0
            if back and self._take_slot(cache, lender, resident, size, force=borrower) is not None:
                self._returning[lender] = held
        for name in sorted(filter(wanted, due_at), key=lambda a: (oldest[a], a)):  # 1. oldest request first
            if self._take_slot(cache, name, resident, size) is None:
                break
        for name in sorted(filter(wanted, first), key=lambda a: (due_at[a], a)):  # 2. a loan for a first step
            lenders = [a for a in resident if self._ready_since[a] < step and a not in self._lent]
            lender = self._take_slot(cache, name, resident, size, lenders)
            if lender:
                self._lent[name] = (lender, self._held_since[lender])
        for name in sorted((a for a in due_at if due_at[a] <= step and wanted(a)), key=lambda a: (due_at[a], a)):
            past = [a for a in resident if step - self._held_since[a] >= self.quantum and a not in self._lent]
            if self._take_slot(cache, name, resident, size, past) is None:  # 3. parked too long
                break

    def _take_slot(self, cache: AdapterCache, name: str, resident: set[str], size: Counter[str],
                   victims: list[str] | None = None, force: str | None = None) -> str | None:
        """Load `name` into a free slot or in place of a resident adapter nobody needs; failing that,
        in place of the one of `victims` with the fewest requests (ties: held longest). `force`: in
        place of that adapter, nothing else. Returns the adapter evicted for it ("" for none), or
        None when no slot could be had now."""
        spare = {a for a in resident if size[a] == 0}
        victim = ""
        if force is not None or not (cache.free_slots or spare):
            pool = [a for a in ([force] if force is not None else victims or []) if a not in self._keep]
            victim = min(pool, key=lambda a: (size[a], self._held_since[a], a), default="")
            if not victim:
                return None
            spare = {victim}
        before = cache.resident
        if not cache.request_load(name, protected=resident - spare):
            return None
        resident -= before - cache.resident  # the adapter evicted for it, if any
        return victim

    def admit(self, s: Scheduler, out: SchedulerOutput, budget: int) -> None:
        seats, blocks = 0, 0  # held for overdue requests whose adapter is loading
        self._short = set()

        def due(req: Request) -> bool:
            return s.step - req.arrival_step >= self.max_wait_steps

        # overdue requests whose adapter is ready (a loan's borrower) go first: a step's budget spent
        # on later arrivals would leave the loan's request unstarted and the loan for nothing
        order = sorted(s.waiting, key=lambda r: not (due(r) and s.adapter_ready(r)))
        for req in order:
            overdue = due(req)
            if budget <= 0:
                if overdue and req.adapter is not None and s.adapter_ready(req) and len(s.running) + seats < s.cfg.max_num_seqs \
                        and s.blocks.blocks_needed(req, req.num_computed + 1) + blocks <= s.blocks.num_free:
                    self._short.add(req.adapter)
                    continue
                break
            need = s.blocks.blocks_needed(req, req.num_computed + s.first_chunk(req, budget))
            if len(s.running) + seats >= s.cfg.max_num_seqs or need + blocks > s.blocks.num_free:
                if overdue:
                    break  # pause admissions until running requests free a seat or blocks for it
                continue
            if s.adapter_ready(req):
                budget -= s.admit(req, out, budget)
            elif overdue:
                seats, blocks = seats + 1, blocks + need
        self._prefetch(s)

    def _prefetch(self, s: Scheduler) -> None:
        """Read the next queued adapters into the host tier, no more of them than the tier has room
        for beside the device-resident ones and those of running requests: more would evict each
        other before use (thrash)."""
        cache = s.cache
        if cache is None:
            return
        room = cache.max_cpu_loras - len(cache.resident | cache.refs.keys())
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
