"""The two admission policies, measured: max_loras=2, a queue spread over 8 adapters, and a stream
of new requests for two hot adapters arriving every step.

- `vllm`: cold requests are skipped while the hot adapters hold the cap, so their wait grows with
  the number of hot requests that keep arriving (the starvation vLLM's own comment warns of).
- `fair`: once overdue, nothing that arrived later goes ahead; every wait stays under the stated
  bound W + cycles x (D + L), where the cycles depend only on the queue ahead of the request,
  never on what arrives after it.
"""

from __future__ import annotations

import math

import pytest

from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters

MAX_LORAS = 2
MAX_SEQS = 8
W = 16  # fair_max_wait_steps
TOKENS = 8  # each request: one prefill step + 7 decode steps
D = TOKENS + 1  # steps one request occupies, with a step of slack for its admission
L = 4  # allowance in steps for an adapter load running beside the steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dir):
    mdir = model_dir("tiny")
    root = tmp_path_factory.mktemp("policy-adapters")
    paths = make_adapters(root, str(mdir), 8, 8, ["q_proj", "v_proj"])
    return mdir, {p.name: p for p in paths}


def drive(setup, policy: str, hot_steps: int):
    mdir, adapters = setup
    names = sorted(adapters)
    llm = LLM(str(mdir), adapters, max_loras=MAX_LORAS, max_cpu_loras=8, max_lora_rank=8, max_num_seqs=MAX_SEQS,
              policy=policy, fair_max_wait_steps=W)
    eng = llm.engine
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompt = list(range(1, 9))
    cold = [eng.add_request(prompt, params, names[i % 8]) for i in range(16)]
    hot = []
    step = 0
    while eng.has_unfinished() or step < hot_steps:
        if step < hot_steps:
            hot.append(eng.add_request(prompt, params, names[step % 2]))
        eng.step()
        step += 1
        assert step < 5000, "the engine stopped making progress"
    llm.close()
    assert all(r.finish_reason == "length" for r in cold + hot)
    return cold, hot, eng


def fair_bound(req, everyone) -> int:
    """The stated bound: W steps to become overdue, then drain cycles of at most D + L steps each,
    as many as the queue *ahead* of it needs (seats and slots), plus one for what is running.
    The queue ahead: requests that arrived no later and were still waiting when it arrived."""
    ahead = [r for r in everyone if r.arrival_step <= req.arrival_step and r.admitted_step >= req.arrival_step]
    cycles = math.ceil(len(ahead) / MAX_SEQS) + math.ceil(len({r.adapter for r in ahead}) / MAX_LORAS) + 1
    return W + cycles * (D + L)


def test_vllm_policy_skips_and_waits_grow_with_the_queue(setup) -> None:
    waits = {}
    for hot_steps in (40, 120):
        cold, hot, eng = drive(setup, "vllm", hot_steps)
        starved = [r for r in cold if r.adapter not in {hot[0].adapter, hot[1].adapter}]
        assert sum(r.skipped for r in starved) > 0
        assert sum(s.skipped for s in eng.steps) > 0
        assert max(s.num_adapters for s in eng.steps) <= MAX_LORAS
        waits[hot_steps] = max(r.wait_steps for r in starved)
    assert waits[40] >= 40, "cold adapters should wait out the hot stream under vLLM's rule"
    assert waits[120] >= waits[40] + 60, f"waits did not grow with the queue: {waits}"


def test_fair_policy_keeps_every_wait_under_its_bound(setup) -> None:
    worst = {}
    for hot_steps in (40, 120):
        cold, hot, eng = drive(setup, "fair", hot_steps)
        everyone = cold + hot
        for r in everyone:
            assert r.wait_steps <= fair_bound(r, everyone), (
                f"{r.request_id} ({r.adapter}) waited {r.wait_steps} steps > bound {fair_bound(r, everyone)}"
            )
        # once a request is overdue, later arrivals go ahead of it only while its adapter is loading
        # (room left over once its seat, blocks and slot are secured): at most L steps before it
        for r in everyone:
            if r.wait_steps > W:
                overtakers = [o for o in everyone if o.arrival_step > r.arrival_step
                              and r.arrival_step + W < o.admitted_step < r.admitted_step - L]
                assert not overtakers, f"{r.request_id} was overtaken while overdue by {overtakers[0].request_id}"
        assert max(s.num_adapters for s in eng.steps) <= MAX_LORAS
        worst[hot_steps] = max(r.wait_steps for r in cold)
    assert worst[120] <= worst[40] + L, f"fair waits grew with the hot stream: {worst}"


def test_fair_beats_vllm_on_the_worst_wait(setup) -> None:
    fair_cold, _, _ = drive(setup, "fair", 120)
    vllm_cold, _, _ = drive(setup, "vllm", 120)
    assert max(r.wait_steps for r in fair_cold) * 2 < max(r.wait_steps for r in vllm_cold)


def test_fair_drains_one_slot_for_an_overdue_request_not_the_batch(setup) -> None:
    """max_loras 2, two hot adapters streaming, one cold request: once overdue it starts within one
    drain (D + L steps), and while it waits at most one hot adapter admits. Known weakness: in this
    scenario the slot usually frees within 2-3 steps, so the first version (whole-batch drain) passes
    too; a scenario where the drain lasts long enough to tell them apart deterministically is still
    to be written (benchmarks/RESULTS.md, fair policy v2)."""
    mdir, adapters = setup
    names = sorted(adapters)
    llm = LLM(str(mdir), adapters, max_loras=2, max_cpu_loras=8, max_lora_rank=8, max_num_seqs=MAX_SEQS,
              policy="fair", fair_max_wait_steps=W)
    eng = llm.engine
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompt = list(range(1, 9))
    hot = [eng.add_request(prompt, params, names[k % 2]) for k in range(4)]
    cold = None
    for step in range(400):
        if step == 2:
            cold = eng.add_request(prompt, params, names[5])
        if step < 120:
            hot.append(eng.add_request(prompt, params, names[step % 2]))
        eng.step()
    while eng.has_unfinished():
        eng.step()
    llm.close()
    assert cold is not None and cold.admitted_step is not None
    overdue_from, started = cold.arrival_step + W, cold.admitted_step
    assert started - overdue_from <= D + L, "the overdue request waited longer than one drain"
    during = [r for r in hot if r.admitted_step is not None and overdue_from < r.admitted_step < started]
    # Adapter loads run on threads, so how soon a slot frees varies run to run; when the wait lasts
    # more than a couple of steps, seats free up meanwhile and only the undrained adapter may use them
    # (the first version admitted nothing until the whole batch had drained: about D steps, none here).
    if started - overdue_from > 3:
        assert during, "no hot request was admitted while the overdue one waited: the whole batch was drained"
    assert len({r.adapter for r in during}) <= 1, "both hot adapters kept admitting: nothing was drained"
