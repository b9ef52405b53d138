"""Adapter sources: SyntheticSource generates exactly what make_adapters writes (as read back by
read_peft_adapter), independently of COUNT; the engine serves a `synthetic:` spec exactly as the
directory; the injected latency; and bad specs are refused with the fix."""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lorascope import LLM, SamplingParams
from lorascope.adapters.peft import AdapterError, read_peft_adapter
from lorascope.adapters.source import DirectorySource, SyntheticSource
from lorascope.adapters.synthetic import adapter_names, make_adapters
from lorascope.engine.engine import _make_source
from lorascope.model.config import LORA_TARGET_MODULES
from lorascope.model.lora import HostAdapter
from lorascope.model.weights import resolve_config

QV = ["q_proj", "v_proj"]
ALL = list(LORA_TARGET_MODULES)
INDICES = [0, 1, 4, 7]


def _assert_same(got: HostAdapter, want: HostAdapter, dtype: torch.dtype) -> None:
    assert got.name == want.name
    assert got.rank == want.rank
    assert got.scales == want.scales
    assert list(got.weights) == list(want.weights)  # same keys, same (layer, module) order
    for key, (a, b) in want.weights.items():
        ga, gb = got.weights[key]
        assert ga.dtype == gb.dtype == a.dtype == dtype
        assert ga.shape == a.shape and gb.shape == b.shape, key
        assert torch.equal(ga, a) and torch.equal(gb, b), f"{got.name} {key} differs from the PEFT directory"


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
@pytest.mark.parametrize("targets", [QV, ALL], ids=["qv", "all"])
def test_load_equals_make_adapters_read_back(tmp_path: Path, preset: str, targets: list[str]) -> None:
    cfg = resolve_config(preset)
    paths = make_adapters(tmp_path, preset, 8, [8, 16], targets, seed=3)
    source = SyntheticSource(8, [8, 16], targets, seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        for i in INDICES:
            name = paths[i].name
            want = read_peft_adapter(paths[i], cfg, 16, dtype=dtype)
            got = source.load(name, cfg, 16, dtype)
            assert got.rank == (8, 16)[i % 2]
            _assert_same(got, want, dtype)


def test_alpha_and_bf16_written_adapters(tmp_path: Path) -> None:
    # make_adapters writing bf16 and reading back bf16 is the float32 draw rounded once: the same as the source's
    cfg = resolve_config("tiny")
    paths = make_adapters(tmp_path, "tiny", 3, 4, ["k_proj", "down_proj"], alpha=3.0, seed=9, dtype=torch.bfloat16)
    source = SyntheticSource(3, 4, ["k_proj", "down_proj"], alpha=3.0, seed=9)
    for path in paths:
        want = read_peft_adapter(path, cfg, 8, dtype=torch.bfloat16)
        _assert_same(source.load(path.name, cfg, 8, torch.bfloat16), want, torch.bfloat16)
        assert want.scales == {"k_proj": 0.75, "down_proj": 0.75}


def test_independent_of_count_names_and_has() -> None:
    cfg = resolve_config("tiny")
    small, large = SyntheticSource(10, [8, 16], QV), SyntheticSource(10_000, [8, 16], QV)
    a = small.load("a0005", cfg, 16, torch.float32)
    b = large.load("a0005", cfg, 16, torch.float32)
    _assert_same(a, b, torch.float32)
    other = large.load("a0006", cfg, 16, torch.float32)
    assert not torch.equal(a.weights[0, "q_proj"][0], other.weights[0, "q_proj"][0][:8])
    assert not torch.equal(
        a.weights[0, "q_proj"][0],
        SyntheticSource(10, [8, 16], QV, seed=1).load("a0005", cfg, 16, torch.float32).weights[0, "q_proj"][0],
    )

    assert small.names() == adapter_names(10) == sorted(small.names())
    names = large.names()
    assert len(names) == 10_000 and names == sorted(names) and names[0] == "a0000" and names[-1] == "a9999"
    assert all(large.has(n) for n in names[::997]) and large.has("a9999")
    assert small.has("a0009") and not small.has("a0010") and not small.has("a10") and not small.has("a00005")
    assert not small.has("b0001") and not small.has("a-001") and not small.has("")
    wide = SyntheticSource(10_001, 8, QV)
    assert wide.has("a10000") and wide.has("a00005") and not wide.has("a0005")


def test_unknown_name_and_rank_above_max(tmp_path: Path) -> None:
    cfg = resolve_config("tiny")
    source = SyntheticSource(3, [8, 32], QV)
    with pytest.raises(AdapterError, match=r"'a0003'.*a0000\.\.a0002.*larger COUNT"):
        source.load("a0003", cfg, 32, torch.float32)
    with pytest.raises(AdapterError, match=r"r=32 is above max_lora_rank=16; raise --max-lora-rank to at least 32"):
        source.load("a0001", cfg, 16, torch.float32)
    # the same kind of error as the PEFT directory gives
    (path,) = make_adapters(tmp_path, "tiny", 1, 32, QV)
    with pytest.raises(AdapterError, match=r"r=32 is above max_lora_rank=16; raise --max-lora-rank to at least 32"):
        read_peft_adapter(path, cfg, 16)
    assert source.load("a0000", cfg, 16, torch.float32).rank == 8


def test_concurrent_loads_are_deterministic() -> None:
    cfg = resolve_config("tiny")
    source = SyntheticSource(4, [8, 16], ALL)
    want = {n: source.load(n, cfg, 16, torch.float32) for n in source.names()}
    got: dict[int, HostAdapter] = {}

    def load(i: int) -> None:
        got[i] = source.load(source.names()[i % 4], cfg, 16, torch.float32)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    for i, adapter in got.items():
        _assert_same(adapter, want[source.names()[i % 4]], torch.float32)


def test_injected_latency_is_a_lower_bound() -> None:
    cfg = resolve_config("tiny")
    source = SyntheticSource(2, 8, QV, load_latency_s=0.03)
    start = time.perf_counter()
    source.load("a0001", cfg, 8, torch.float32)
    assert time.perf_counter() - start >= 0.03
    parsed = SyntheticSource.parse("synthetic:2:8:30")
    assert parsed.load_latency_s == pytest.approx(0.03)
    start = time.perf_counter()
    parsed.load("a0000", cfg, 8, torch.float32)
    assert time.perf_counter() - start >= 0.03


def test_parse_fields_and_defaults() -> None:
    s = SyntheticSource.parse("synthetic:10000:16:20")
    assert (s.count, s.ranks, s.load_latency_s, s.seed, s.targets) == (10_000, [16], pytest.approx(0.02), 0, QV)
    s = SyntheticSource.parse("synthetic:50")
    assert (s.count, s.ranks, s.load_latency_s, s.seed) == (50, [16], 0.0, 0)
    s = SyntheticSource.parse("synthetic:50::2.5:7", default_latency_s=1.0)
    assert (s.ranks, s.load_latency_s, s.seed) == ([16], pytest.approx(0.0025), 7)
    s = SyntheticSource.parse("synthetic:50:8,16", default_latency_s=0.5)
    assert (s.ranks, s.load_latency_s) == ([8, 16], 0.5)
    assert SyntheticSource.parse(s.spec()).spec() == s.spec() == "synthetic:50:8,16:500:0"


def test_engine_spec_latency() -> None:
    # the spec's LATENCY_MS wins; without one the engine's adapter_load_latency_s applies
    with_latency = _make_source("synthetic:5:8:20", 0.5)
    assert isinstance(with_latency, SyntheticSource) and with_latency.load_latency_s == pytest.approx(0.02)
    without = _make_source("synthetic:5:8", 0.5)
    assert isinstance(without, SyntheticSource) and without.load_latency_s == 0.5
    assert isinstance(_make_source(None, 0.0), DirectorySource)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("synthetic:abc", r"COUNT must be a positive integer: synthetic:COUNT\[:RANK\[:LATENCY_MS\[:SEED\]\]\]"),
        ("synthetic:", "COUNT must be a positive integer"),
        ("synthetic:0", "COUNT must be a positive integer"),
        ("synthetic:1.5", "COUNT must be a positive integer"),
        ("synthetic:10:0", "RANK must be a positive integer or a comma list"),
        ("synthetic:10:x", "RANK must be a positive integer or a comma list"),
        ("synthetic:10:8,", "RANK must be a positive integer or a comma list"),
        ("synthetic:10:8:-1", "LATENCY_MS must be a number of milliseconds >= 0"),
        ("synthetic:10:8:nan", "LATENCY_MS must be a number of milliseconds >= 0"),
        ("synthetic:10:8:fast", "LATENCY_MS must be a number of milliseconds >= 0"),
        ("synthetic:10:8:20:-3", "SEED must be an integer >= 0"),
        ("synthetic:10:8:20:s", "SEED must be an integer >= 0"),
        ("synthetic:10:8:20:0:x", r"at most 4 are allowed: synthetic:COUNT"),
        ("adapters/", r"not a synthetic source; write it as synthetic:COUNT"),
    ],
)
def test_bad_specs_name_the_fix(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SyntheticSource.parse(spec)


def test_bad_arguments_and_engine_spec_errors() -> None:
    with pytest.raises(ValueError, match="count"):
        SyntheticSource(0, 8, QV)
    with pytest.raises(ValueError, match="rank"):
        SyntheticSource(3, [], QV)
    with pytest.raises(ValueError, match="lm_head"):
        SyntheticSource(3, 8, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="alpha"):
        SyntheticSource(3, 8, QV, alpha=0.0)
    with pytest.raises(ValueError, match="seed"):
        SyntheticSource(3, 8, QV, seed=-1)
    with pytest.raises(ValueError, match="latency"):
        SyntheticSource(3, 8, QV, load_latency_s=-0.1)
    with pytest.raises(ValueError, match="COUNT must be a positive integer"):
        LLM("tiny", "synthetic:many")


def _generate(adapters: str | Path, reqs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    llm = LLM("tiny", adapters, max_loras=4)
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        outs = llm.generate([p for p, _ in reqs], params, [a for _, a in reqs])
        return [o.token_ids for o in outs]
    finally:
        llm.close()


def test_engine_serves_spec_like_the_directory(tmp_path: Path) -> None:
    make_adapters(tmp_path, "tiny", 50, 8, QV)
    vocab = resolve_config("tiny").vocab_size
    gen = torch.Generator().manual_seed(0)
    names: list[str | None] = ["a0000", "a0007", None, "a0049", "a0023", "a0007", None, "a0031", "a0012"]
    reqs = [(torch.randint(0, vocab, (4 + 3 * i,), generator=gen).tolist(), name) for i, name in enumerate(names)]
    from_spec = _generate("synthetic:50:8", reqs)
    from_dir = _generate(str(tmp_path), reqs)
    assert from_spec == from_dir
    assert all(len(t) == 12 for t in from_spec)
    # the adapters matter: with adapters dropped, the adapted requests' tokens change
    base = _generate(str(tmp_path), [(p, None) for p, _ in reqs])
    assert any(base[i] != from_spec[i] for i, n in enumerate(names) if n is not None)


def test_load_order_does_not_matter() -> None:
    # adapter i depends on (seed, i) alone: loads in any order, on fresh or used sources, agree
    cfg = resolve_config("tiny")
    forward = SyntheticSource(6, [4, 8, 16], QV, seed=5)
    backward = SyntheticSource(6, [4, 8, 16], QV, seed=5)
    want = {n: forward.load(n, cfg, 16, torch.bfloat16) for n in forward.names()}
    for name in reversed(backward.names()):
        _assert_same(backward.load(name, cfg, 16, torch.bfloat16), want[name], torch.bfloat16)
    _assert_same(forward.load("a0002", cfg, 16, torch.bfloat16), want["a0002"], torch.bfloat16)


def test_ranks_shape_every_tensor() -> None:
    cfg = resolve_config("tiny-qwen2")
    source = SyntheticSource(3, [4, 8, 16], ALL)
    for name, r in zip(source.names(), (4, 8, 16), strict=True):
        adapter = source.load(name, cfg, 16, torch.float32)
        assert adapter.rank == source.rank_of(name) == r
        assert adapter.scales == dict.fromkeys(ALL, 2.0)
        assert len(adapter.weights) == cfg.num_hidden_layers * len(ALL)
        for (_, module), (a, b) in adapter.weights.items():
            fan_in, fan_out = cfg.module_shape(module)
            assert a.shape == (r, fan_in) and b.shape == (fan_out, r)
            assert a.is_contiguous() and b.is_contiguous()


def _top_level_torch_calls(load: Callable[[], object]) -> int:
    with warnings.catch_warnings():  # some torch releases warn about the profiler's cycles on entry
        warnings.simplefilter("ignore", UserWarning)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            load()
    return sum(1 for e in prof.events() if e.cpu_parent is None)


def test_a_load_is_a_few_torch_calls_on_one_buffer() -> None:
    # loader threads run beside the engine thread, and every torch call takes the GIL back from it:
    # a load's calls must not grow with the layers (the 8B shape has 32 layers, 128 q/v tensors)
    source = SyntheticSource(2, 16, QV, pin_memory=False)
    _top_level_torch_calls(
        lambda: source.load("a0000", resolve_config("tiny"), 16, torch.bfloat16)
    )  # the profiler's own first-use events
    calls = {}
    big = resolve_config("llama-3.1-8b")
    for name, cfg in (
        ("tiny", resolve_config("tiny")),
        ("8b", big),
        ("8b-64-layers", dataclasses.replace(big, num_hidden_layers=64)),
    ):
        calls[name] = _top_level_torch_calls(lambda cfg=cfg: source.load("a0001", cfg, 16, torch.bfloat16))
        adapter = source.load("a0001", cfg, 16, torch.bfloat16)
        storages = {t.untyped_storage().data_ptr() for pair in adapter.weights.values() for t in pair}
        assert len(storages) == 1  # views of one buffer: one pinned allocation on a CUDA host
        assert adapter.size_bytes == sum(t.numel() * 2 for pair in adapter.weights.values() for t in pair)
    # a block whose size is not a multiple of the table's piece costs one slice call (tiny's four blocks)
    assert calls["8b"] == calls["8b-64-layers"] <= calls["tiny"] <= 25, calls


def test_pin_memory_default() -> None:
    assert SyntheticSource(1).pin_memory is torch.cuda.is_available()
    assert SyntheticSource(1, pin_memory=False).pin_memory is False
    cfg = resolve_config("tiny")
    assert not any(
        a.is_pinned()
        for a, _ in SyntheticSource(1, pin_memory=False).load("a0000", cfg, 16, torch.bfloat16).weights.values()
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_load_is_what_the_cache_keeps() -> None:
    # the adapter cache pins every host tensor on a CUDA engine; pinned views come back as they are
    cfg = resolve_config("tiny")
    source = SyntheticSource(2, [8, 16], QV, seed=1, pin_memory=True)
    unpinned = SyntheticSource(2, [8, 16], QV, seed=1, pin_memory=False)
    for dtype in (torch.bfloat16, torch.float32):
        adapter = source.load("a0001", cfg, 16, dtype)
        for a, b in adapter.weights.values():
            assert a.is_pinned() and b.is_pinned()
            assert a.pin_memory() is a and b.pin_memory() is b
        _assert_same(adapter, unpinned.load("a0001", cfg, 16, dtype), dtype)
