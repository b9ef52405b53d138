"""Synthetic adapters: names, ranks, determinism, the delta's size, and their effect in real PEFT."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorascope.adapters.peft import list_adapter_dirs, read_peft_adapter
from lorascope.adapters.synthetic import DELTA_TO_BASE, adapter_names, make_adapters, synthetic_adapter
from lorascope.model.config import LORA_TARGET_MODULES
from lorascope.model.weights import load_model, resolve_config, save_model

TINY = resolve_config("tiny")


def test_names_are_zero_padded() -> None:
    assert adapter_names(1) == ["a0000"]
    assert adapter_names(3) == ["a0000", "a0001", "a0002"]
    assert adapter_names(10_000)[-1] == "a9999"
    names = adapter_names(10_001)
    assert names[0] == "a00000" and names[-1] == "a10000"


def test_writes_readable_adapters(tmp_path: Path) -> None:
    paths = make_adapters(tmp_path, "tiny", 3, 8, ["q_proj", "down_proj"])
    assert paths == [tmp_path / n for n in ("a0000", "a0001", "a0002")]
    assert list(list_adapter_dirs(tmp_path)) == ["a0000", "a0001", "a0002"]
    adapter = read_peft_adapter(paths[0], TINY, 8)
    assert adapter.rank == 8 and adapter.modules == {"q_proj", "down_proj"}
    assert adapter.scales == {"q_proj": 2.0, "down_proj": 2.0}  # alpha defaults to 2 * rank
    assert len(adapter.weights) == 2 * TINY.num_hidden_layers
    for a, b in adapter.weights.values():
        assert a.count_nonzero() > 0.99 * a.numel()
        assert b.count_nonzero() > 0.99 * b.numel()


def test_heterogeneous_ranks_and_alpha(tmp_path: Path) -> None:
    paths = make_adapters(tmp_path, "tiny", 5, [8, 16], ["v_proj"])
    assert [read_peft_adapter(p, TINY, 16).rank for p in paths] == [8, 16, 8, 16, 8]
    fixed = make_adapters(tmp_path / "fixed", "tiny", 2, [4, 16], ["v_proj"], alpha=8.0)
    assert [read_peft_adapter(p, TINY, 16).scales["v_proj"] for p in fixed] == [2.0, 0.5]


def test_deterministic_and_independent_of_count(tmp_path: Path) -> None:
    few = make_adapters(tmp_path / "few", "tiny", 3, [4, 8], ["q_proj", "o_proj"], seed=7)
    many = make_adapters(tmp_path / "many", "tiny", 12, [4, 8], ["q_proj", "o_proj"], seed=7)
    other_seed = make_adapters(tmp_path / "other", "tiny", 3, [4, 8], ["q_proj", "o_proj"], seed=8)
    assert (few[2] / "adapter_model.safetensors").read_bytes() == (many[2] / "adapter_model.safetensors").read_bytes()
    a, b, c = (read_peft_adapter(p, TINY, 8) for p in (few[0], few[2], other_seed[0]))
    assert not torch.equal(a.weights[0, "q_proj"][0], b.weights[0, "q_proj"][0])
    assert not torch.equal(a.weights[0, "q_proj"][0], c.weights[0, "q_proj"][0])


def test_bfloat16(tmp_path: Path) -> None:
    (path,) = make_adapters(tmp_path, "tiny", 1, 4, ["q_proj"], dtype=torch.bfloat16)
    f32 = make_adapters(tmp_path / "f32", "tiny", 1, 4, ["q_proj"])[0]
    half = read_peft_adapter(path, TINY, 8, dtype=torch.bfloat16)
    full = read_peft_adapter(f32, TINY, 8)
    assert half.weights[0, "q_proj"][0].dtype == torch.bfloat16
    assert torch.equal(half.weights[0, "q_proj"][0], full.weights[0, "q_proj"][0].to(torch.bfloat16))


@pytest.mark.parametrize("module", ["q_proj", "v_proj", "down_proj"])
def test_delta_is_half_the_base_output(tmp_path: Path, module: str) -> None:
    (path,) = make_adapters(tmp_path, "tiny", 1, 16, [module])
    adapter = read_peft_adapter(path, TINY, 16)
    a, b = adapter.weights[1, module]
    fan_in, _ = TINY.module_shape(module)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, fan_in, generator=gen)  # unit-RMS input
    layer = load_model("tiny").model.model.layers[1]
    base_w = getattr(layer.mlp if module in ("gate_proj", "up_proj", "down_proj") else layer.self_attn, module).weight
    ratio = (adapter.scales[module] * x @ a.T @ b.T).std() / (x @ base_w.T).std()
    assert ratio == pytest.approx(DELTA_TO_BASE, rel=0.25)


@pytest.mark.parametrize(
    ("count", "rank", "targets", "alpha", "needle"),
    [
        (0, 8, ["q_proj"], None, "count"),
        (2, 0, ["q_proj"], None, "rank"),
        (2, [], ["q_proj"], None, "rank"),
        (2, 8, ["q_proj", "lm_head"], None, "lm_head"),
        (2, 8, [], None, "target"),
        (2, 8, ["q_proj"], -1.0, "alpha"),
    ],
)
def test_rejects_bad_input(tmp_path: Path, count: int, rank: int | list[int], targets: list[str], alpha: float | None, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_adapters(tmp_path, "tiny", count, rank, targets, alpha=alpha)
    assert not any(tmp_path.iterdir())


def test_changes_model_outputs(tmp_path: Path) -> None:
    save_model(load_model("tiny"), tmp_path / "base")
    (path,) = make_adapters(tmp_path / "ad", "tiny", 1, 8, list(LORA_TARGET_MODULES))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, path)
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    rel = float((adapted - base).norm() / base.norm())
    assert math.isfinite(rel) and torch.isfinite(adapted).all()
    assert rel > 0.05, rel  # visibly different
    assert adapted.std() < 2 * base.std()  # ...without blowing up


@pytest.mark.slow
def test_thousand_tiny_adapters_are_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    paths = make_adapters(tmp_path, "tiny", 1000, [8, 16], list(LORA_TARGET_MODULES))
    elapsed = time.perf_counter() - start
    assert len(paths) == 1000 and paths[-1].name == "a0999"
    assert elapsed < 10, f"1,000 tiny adapters took {elapsed:.1f} s"


def test_values_are_lora_init_like(tmp_path: Path) -> None:
    # uniform in [-sqrt(3) std, sqrt(3) std]: A with std 1/sqrt(in) (PEFT's lora_A init is uniform too),
    # zero mean, no value repeated so often that the draw looks degenerate; bfloat16 numbers exactly
    (path,) = make_adapters(tmp_path, "tiny", 1, 16, ["q_proj", "down_proj"])
    adapter = read_peft_adapter(path, TINY, 16)
    for module in ("q_proj", "down_proj"):
        fan_in, _ = TINY.module_shape(module)
        a = torch.cat([adapter.weights[layer, module][0].flatten() for layer in range(TINY.num_hidden_layers)])
        std = 1 / math.sqrt(fan_in)
        assert a.std().item() == pytest.approx(std, rel=0.05)
        assert abs(a.mean().item()) < 0.05 * std
        assert a.abs().max().item() <= math.sqrt(3) * std * 1.01
        assert a.unique().numel() > 0.05 * a.numel()
        assert torch.equal(a, a.to(torch.bfloat16).float())


def test_same_adapter_whatever_the_dtype() -> None:
    _, _, half = synthetic_adapter(TINY, [8], ["q_proj", "v_proj"], None, 2, 3, torch.bfloat16)
    _, _, full = synthetic_adapter(TINY, [8], ["q_proj", "v_proj"], None, 2, 3, torch.float32)
    _, _, fp16 = synthetic_adapter(TINY, [8], ["q_proj", "v_proj"], None, 2, 3, torch.float16)
    assert list(half) == list(full) == sorted(full)
    for key, (a, b) in half.items():
        assert torch.equal(a.float(), full[key][0]) and torch.equal(b.float(), full[key][1])
        assert torch.equal(full[key][0].half(), fp16[key][0]) and torch.equal(full[key][1].half(), fp16[key][1])
