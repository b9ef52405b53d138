"""The tiered adapter cache: LRU/FIFO order and counters for both tiers, referenced adapters never
evicted (time-sliced: only the slots the current step uses are kept, and the host tier keeps every
referenced adapter), and loads beside the step: a running decode keeps producing tokens during a
slow load."""

from __future__ import annotations

import time

import pytest
import torch

from lorascope import SamplingParams
from lorascope.adapters.cache import AdapterCache
from lorascope.adapters.source import DirectorySource
from lorascope.adapters.synthetic import make_adapters
from lorascope.config import EngineConfig
from lorascope.engine.engine import LLMEngine
from lorascope.model.lora import LoRASlotStore
from lorascope.model.presets import PRESETS


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("tier-adapters")
    paths = make_adapters(root, str(model_dir("tiny")), 6, 8, ["q_proj", "v_proj"])
    return {p.name: p for p in paths}


def make_cache(adapters, max_loras: int, max_cpu_loras: int, eviction: str = "lru", time_sliced: bool = False) -> AdapterCache:
    cfg = PRESETS["tiny"]
    store = LoRASlotStore(cfg, max_loras, 8, torch.float32, torch.device("cpu"), ("q_proj", "v_proj"))
    return AdapterCache(DirectorySource(adapters), cfg, store, max_cpu_loras, eviction, time_sliced=time_sliced)


def load(cache: AdapterCache, name: str) -> None:
    assert cache.request_load(name)
    while not cache.is_ready(name):
        cache.wait_for_loads(1.0)
        cache.poll()
        assert name not in cache.failed, cache.failed[name]


def test_lru_tiers_and_counters(adapters) -> None:
    names = sorted(adapters)
    a, b, c, d = names[:4]
    cache = make_cache(adapters, max_loras=1, max_cpu_loras=3)
    for name in (a, b, c, a, d):
        load(cache, name)
    # host tier: a, b, c read from disk; a found on the host; d evicts b, the least recently used
    assert set(cache.host) == {a, c, d}
    assert cache.host_counters.misses == 4 and cache.host_counters.loads == 4
    assert cache.host_counters.hits == 1 and cache.host_counters.evictions == 1
    assert cache.host_counters.load_seconds > 0
    # device tier: one slot, every load after the first evicts
    assert cache.resident == {d}
    assert cache.device_counters.loads == 5 and cache.device_counters.misses == 5
    assert cache.device_counters.evictions == 4 and cache.device_counters.load_seconds > 0
    cache.acquire(d)  # resident: a hit
    assert cache.device_counters.hits == 0, "the first acquire of a fresh load counts as its miss"
    cache.release(d)
    cache.acquire(d)
    assert cache.device_counters.hits == 1
    cache.close()


def test_fifo_evicts_first_loaded_even_if_used(adapters) -> None:
    a, b, c, d = sorted(adapters)[:4]
    cache = make_cache(adapters, max_loras=1, max_cpu_loras=3, eviction="fifo")
    for name in (a, b, c, a, d):
        load(cache, name)
    assert set(cache.host) == {b, c, d}, "FIFO: a was first in, so a goes although it was used again"
    cache.close()


def test_referenced_and_protected_adapters_stay(adapters) -> None:
    a, b, c = sorted(adapters)[:3]
    cache = make_cache(adapters, max_loras=2, max_cpu_loras=4)
    load(cache, a)
    load(cache, b)
    cache.acquire(a)
    assert not cache.request_load(c, protected={b}), "a is in use and b protected: no slot"
    assert cache.resident == {a, b}
    assert cache.request_load(c)  # b is evictable now
    load(cache, c)
    assert cache.resident == {a, c}
    cache.close()


def test_time_sliced_slots_are_kept_only_for_the_step_that_uses_them(adapters) -> None:
    """Time-sliced (the fair policy): an adapter with running requests may lose its device slot
    between steps, never during a step that uses it, and it stays on the host tier."""
    a, b, c = sorted(adapters)[:3]
    cache = make_cache(adapters, max_loras=2, max_cpu_loras=2, time_sliced=True)
    load(cache, a)
    load(cache, b)
    cache.acquire(a)
    cache.acquire(b)
    cache.begin_step()
    cache.use(a)
    cache.use(b)
    assert not cache.request_load(c), "both slots are read by this step"
    cache.begin_step()
    cache.use(b)
    assert cache.request_load(c), "a is referenced but not used by this step: its slot may go"
    load(cache, c)
    assert cache.resident == {b, c} and cache.refs[a] == 1
    assert {a, b} <= set(cache.host), "the host tier dropped an adapter that running requests need"
    assert len(cache.host) == 3, "max_cpu_loras 2, held one more for the referenced adapters"
    with pytest.raises(RuntimeError, match="before it was ready"):
        cache.use(a)
    cache.close()


def test_referenced_adapters_keep_their_slots_without_time_slicing(adapters) -> None:
    a, b = sorted(adapters)[:2]
    cache = make_cache(adapters, max_loras=1, max_cpu_loras=2)
    load(cache, a)
    cache.acquire(a)
    cache.begin_step()  # a not used by this step, but referenced: the vllm policy keeps it
    assert not cache.request_load(b)
    cache.release(a)
    assert cache.request_load(b)
    cache.close()


def test_slot_weights_match_the_adapter_file(adapters) -> None:
    from lorascope.adapters.peft import read_peft_adapter

    name = sorted(adapters)[2]
    cache = make_cache(adapters, max_loras=3, max_cpu_loras=3)
    load(cache, name)
    slot = cache.slot_of[name]
    host = read_peft_adapter(adapters[name], PRESETS["tiny"], 8, name=name)
    for (layer, module), (a, b) in host.weights.items():
        r = a.shape[0]
        assert torch.equal(cache.store.a[layer, module][slot, :r], a)
        assert torch.equal(cache.store.b[layer, module][slot, :, :r], b)
    assert cache.store.ranks["q_proj"][slot] == 8 and cache.store.ranks["k_proj"][slot] == 0
    cache.close()


def test_decode_continues_during_a_slow_load(adapters, model_dir) -> None:
    """A request for a cold adapter whose load takes 1.5 s must not stall the running batch."""
    names = sorted(adapters)
    engine = LLMEngine(EngineConfig(model=str(model_dir("tiny")), max_loras=2, max_lora_rank=8), adapters)
    engine.preload([names[0]])
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    running = engine.add_request(list(range(1, 9)), params, names[0])
    engine.step()
    engine.source.load_latency_s = 1.5  # every disk read from now on is slow
    cold = engine.add_request(list(range(1, 9)), SamplingParams(max_tokens=4, temperature=0.0), names[1])
    start = time.monotonic()
    tokens_before = len(running.output_ids)
    longest_step = 0.0
    while cold.admitted_step is None:
        t0 = time.monotonic()
        engine.step()
        longest_step = max(longest_step, time.monotonic() - t0)
        assert time.monotonic() - start < 30
    load_time = time.monotonic() - start
    produced = len(running.output_ids) - tokens_before
    assert load_time >= 1.5, "the load was not slow: the test would be blind"
    # a load inside the step would give one 1.5 s step and no tokens in between
    assert produced >= 3, f"only {produced} tokens during a {load_time:.1f} s load"
    assert longest_step < 0.75, f"a step took {longest_step:.2f} s: the load ran inside it"
    engine.close()


def test_prefetch_does_not_thrash_a_small_host_tier(model_dir, tmp_path) -> None:
    """16 adapters queued, host tier of 4: prefetching must not read adapters from disk over and
    over by evicting the ones it just read (seen once: 509 disk reads for 16 adapters)."""
    from lorascope import LLM

    paths = make_adapters(tmp_path, str(model_dir("tiny")), 16, 8, ["q_proj", "v_proj"])
    llm = LLM(str(model_dir("tiny")), {p.name: p for p in paths}, max_loras=4, max_cpu_loras=4, max_lora_rank=8,
              max_model_len=128, num_kv_blocks=64)
    names = sorted(p.name for p in paths)
    llm.generate([[1, 2, 3]] * 32, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                 [names[i % 16] for i in range(32)])
    host = llm.engine.cache.host_counters
    llm.close()
    assert host.loads <= 3 * 16, f"{host.loads} disk reads for 16 adapters: the host tier thrashes"


def test_an_adapter_that_fails_to_load_fails_its_requests_only(adapters, model_dir, tmp_path) -> None:
    """A registered adapter whose files went bad: its requests finish with an error naming it,
    the others complete, and nothing is held afterwards."""
    import shutil

    from lorascope import LLM

    names = sorted(adapters)
    broken = tmp_path / "broken"
    shutil.copytree(adapters[names[0]], broken)
    (broken / "adapter_model.safetensors").unlink()
    llm = LLM(str(model_dir("tiny")), {"broken": broken, names[1]: adapters[names[1]]}, max_loras=2, max_lora_rank=8,
              max_model_len=128, num_kv_blocks=64)
    outs = llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                        ["broken", names[1], "broken", None])
    engine = llm.engine
    llm.close()
    assert [o.finish_reason for o in outs] == ["error", "length", "error", "length"]
    assert "broken" in outs[0].error and "could not be loaded" in outs[0].error
    assert not engine.requests and not engine.cache.refs and engine.blocks.num_free == engine.blocks.num_blocks
