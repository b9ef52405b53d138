"""PEFT adapter directories: our writer against real PEFT, our reader against real PEFT output, and
every validation error of read_peft_adapter (message names adapter, field/tensor and fix)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorascope.adapters.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    list_adapter_dirs,
    peft_config_dict,
    peft_key,
    read_peft_adapter,
    write_peft_adapter,
)
from lorascope.model.config import ATTN_MODULES, LORA_TARGET_MODULES, MLP_MODULES, ModelConfig
from lorascope.model.weights import load_model, resolve_config, save_model

TINY = resolve_config("tiny")
Weights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def _random_weights(cfg: ModelConfig, targets: list[str] | tuple[str, ...], r: int, seed: int = 0) -> Weights:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(cfg.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = cfg.module_shape(module)
            weights[layer, module] = (torch.randn(r, fan_in, generator=gen), torch.randn(fan_out, r, generator=gen))
    return weights


def _write(path: Path, targets: tuple[str, ...] = ("q_proj", "v_proj"), r: int = 4, cfg: ModelConfig = TINY, **kw) -> Weights:
    weights = _random_weights(cfg, targets, r)
    write_peft_adapter(path, weights, r, 2.0 * r, list(targets), "tiny", **kw)
    return weights


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base")
    for preset in ("tiny", "tiny-qwen2"):
        save_model(load_model(preset), root / preset)
    return {p.name: p for p in root.iterdir()}


def test_round_trip(tmp_path: Path) -> None:
    weights = _write(tmp_path / "ad", targets=LORA_TARGET_MODULES, r=8)
    adapter = read_peft_adapter(tmp_path / "ad", TINY, max_lora_rank=16)
    assert adapter.name == "ad" and adapter.rank == 8
    assert adapter.scales == dict.fromkeys(LORA_TARGET_MODULES, 2.0)
    assert adapter.weights.keys() == weights.keys()
    for key, (a, b) in weights.items():
        got_a, got_b = adapter.weights[key]
        assert torch.equal(got_a, a) and torch.equal(got_b, b) and got_a.is_contiguous()
    half = read_peft_adapter(tmp_path / "ad", TINY, 16, name="other", dtype=torch.bfloat16)
    assert half.name == "other" and half.weights[0, "q_proj"][0].dtype == torch.bfloat16


def test_rslora_scale(tmp_path: Path) -> None:
    _write(tmp_path / "ad", r=16, use_rslora=True)
    assert read_peft_adapter(tmp_path / "ad", TINY, 16).scales["q_proj"] == pytest.approx(32 / math.sqrt(16))


def test_config_mirrors_peft_lora_config(tmp_path: Path) -> None:
    targets = ["v_proj", "q_proj"]
    LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM", lora_dropout=0.0,
               inference_mode=True, base_model_name_or_path="tiny").save_pretrained(str(tmp_path))
    theirs = json.loads((tmp_path / CONFIG_FILE).read_text())
    ours = peft_config_dict(8, 16.0, targets, "tiny")
    assert ours.keys() == theirs.keys()
    assert sorted(ours.pop("target_modules")) == sorted(theirs.pop("target_modules"))  # PEFT saves a set: any order
    assert {k: v for k, v in ours.items() if k != "peft_version"} == {k: v for k, v in theirs.items() if k != "peft_version"}


def test_list_adapter_dirs(tmp_path: Path) -> None:
    for name in ("b", "a"):
        _write(tmp_path / name)
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "a" / "nested").mkdir()  # only immediate subdirectories count
    assert list_adapter_dirs(tmp_path) == {"a": tmp_path / "a", "b": tmp_path / "b"}
    with pytest.raises(AdapterError, match="not a directory"):
        list_adapter_dirs(tmp_path / "missing")


@pytest.mark.parametrize(
    ("preset", "targets"),
    [("tiny", ATTN_MODULES), ("tiny", MLP_MODULES), ("tiny-qwen2", LORA_TARGET_MODULES)],
)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_real_peft_loads_our_files(base_dirs: dict[str, Path], tmp_path: Path, preset: str, targets: tuple[str, ...], use_rslora: bool) -> None:
    cfg = resolve_config(preset)
    weights = _write(tmp_path / "ad", targets=targets, r=8, cfg=cfg, use_rslora=use_rslora)
    ours = read_peft_adapter(tmp_path / "ad", cfg, 8)
    model = AutoModelForCausalLM.from_pretrained(base_dirs[preset], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, tmp_path / "ad")
    layers = peft_model.base_model.model.model.layers
    for (layer, module), (a, b) in weights.items():
        parent = layers[layer].self_attn if module in ATTN_MODULES else layers[layer].mlp
        lora = getattr(parent, module)
        assert torch.equal(lora.lora_A["default"].weight, a)
        assert torch.equal(lora.lora_B["default"].weight, b)
        assert lora.scaling["default"] == pytest.approx(ours.scales[module])


@pytest.mark.parametrize(
    "lora_kw",
    [
        {"target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"target_modules": "all-linear"},
        {"target_modules": r".*\.(k_proj|up_proj)"},
        {"target_modules": ["o_proj", "gate_proj"], "layers_to_transform": [1, 3]},
        {"target_modules": ["model.layers.0.mlp.up_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["k_proj"], "use_rslora": True},
    ],
)
def test_reads_real_peft_adapter(base_dirs: dict[str, Path], tmp_path: Path, lora_kw: dict) -> None:
    torch.manual_seed(0)  # init_lora_weights=False draws A and B (non-zero) from the global RNG
    model = AutoModelForCausalLM.from_pretrained(base_dirs["tiny"], dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, **lora_kw))
    peft_model.save_pretrained(tmp_path / "ad")
    adapter = read_peft_adapter(tmp_path / "ad", TINY, 8)
    expected = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer, module_name = int(name.split(".")[2]), name.rsplit(".", 1)[1]
            expected[layer, module_name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
            assert adapter.scales[module_name] == pytest.approx(module.scaling["default"])
    assert expected and adapter.weights.keys() == expected.keys()
    for key, (a, b) in expected.items():
        assert torch.equal(adapter.weights[key][0], a) and torch.equal(adapter.weights[key][1], b)
        assert b.abs().sum() > 0


@pytest.mark.parametrize(
    ("target_modules", "modules"),
    [("all-linear", LORA_TARGET_MODULES), (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", ("q_proj", "v_proj"))],
)
def test_target_modules_as_string(tmp_path: Path, target_modules: str, modules: tuple[str, ...]) -> None:
    _write(tmp_path / "ad", targets=modules)
    _edit_config(tmp_path / "ad", target_modules=target_modules)
    assert read_peft_adapter(tmp_path / "ad", TINY, 8).modules == set(modules)


def test_accepts_adapter_name_infix(tmp_path: Path) -> None:
    weights = _write(tmp_path / "ad")
    path = tmp_path / "ad" / WEIGHTS_FILE
    tensors = load_file(path)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, path)
    adapter = read_peft_adapter(tmp_path / "ad", TINY, 8)
    assert torch.equal(adapter.weights[0, "q_proj"][1], weights[0, "q_proj"][1])


# --- validation errors ------------------------------------------------------------------------


def _edit_config(path: Path, **changes) -> None:
    conf = json.loads((path / CONFIG_FILE).read_text())
    conf.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(conf))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


def _error(path: Path, *needles: str, max_lora_rank: int = 64) -> str:
    """read_peft_adapter's AdapterError; its message must name the adapter and hold every needle."""
    with pytest.raises(AdapterError) as info:
        read_peft_adapter(path, TINY, max_lora_rank, name="my-adapter")
    msg = str(info.value)
    assert "'my-adapter'" in msg and str(path) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_error_missing_directory(tmp_path: Path) -> None:
    _error(tmp_path / "nope", "directory not found", CONFIG_FILE)


def test_error_missing_config(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_FILE).unlink()
    _error(tmp_path / "ad", CONFIG_FILE, "missing", "save_pretrained")


def test_error_config_not_json(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_FILE).write_text("{not json")
    _error(tmp_path / "ad", CONFIG_FILE, "not valid JSON", "re-save")


def test_error_missing_safetensors(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    (tmp_path / "ad" / WEIGHTS_FILE).unlink()
    _error(tmp_path / "ad", WEIGHTS_FILE, "missing", "save_pretrained")


def test_error_only_bin(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    (tmp_path / "ad" / WEIGHTS_FILE).rename(tmp_path / "ad" / "adapter_model.bin")
    _error(tmp_path / "ad", "adapter_model.bin", "not supported", "save_file(", WEIGHTS_FILE)


def test_error_corrupt_safetensors(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    (tmp_path / "ad" / WEIGHTS_FILE).write_bytes(b"garbage")
    _error(tmp_path / "ad", WEIGHTS_FILE, "cannot be read", "re-save")


def test_error_not_lora(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", peft_type="IA3")
    _error(tmp_path / "ad", "peft_type", "'IA3'", "only LoRA")


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("use_dora", True, "retrain as plain LoRA"),
        ("modules_to_save", ["lm_head"], "retrain without modules_to_save"),
        ("bias", "all", "bias='none'"),
        ("fan_in_fan_out", True, "fan_in_fan_out=False"),
        ("rank_pattern", {"q_proj": 8}, "one r"),
        ("alpha_pattern", {"q_proj": 8}, "one lora_alpha"),
    ],
)
def test_error_unsupported_feature(tmp_path: Path, key: str, value: object, fix: str) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", **{key: value})
    _error(tmp_path / "ad", key, "unsupported", fix)


def test_error_unknown_target(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", target_modules=["q_proj", "c_attn"])
    _error(tmp_path / "ad", "'c_attn'", "target_modules", "another base model")


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head", ".*embed_tokens"])
def test_error_unsupported_target(tmp_path: Path, target: str) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", target_modules=target if target.startswith(".") else ["q_proj", target])
    _error(tmp_path / "ad", target.lstrip(".*"), "target_modules", "unsupported", "retrain with target_modules limited")


def test_error_regex_matches_nothing(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", target_modules=r".*\.c_attn")
    _error(tmp_path / "ad", "target_modules", "c_attn", "selects no module", "another base model")


def test_error_rank_above_max(tmp_path: Path) -> None:
    _write(tmp_path / "ad", r=16)
    _error(tmp_path / "ad", "r=16", "max_lora_rank=8", "raise --max-lora-rank to at least 16", max_lora_rank=8)


def test_error_unparseable_key(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    _edit_tensors(tmp_path / "ad", lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}))
    _error(tmp_path / "ad", "'base_model.model.lm_head.weight'", "not a LoRA weight", "remove it")


def test_error_layer_out_of_range(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    key = peft_key(TINY.num_hidden_layers, "q_proj", "A")
    _edit_tensors(tmp_path / "ad", lambda t: t.update({key: torch.zeros(4, TINY.hidden_size)}))
    _error(tmp_path / "ad", repr(key), f"layers 0..{TINY.num_hidden_layers - 1}", "another base model")


def test_error_target_without_tensors(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", target_modules=["q_proj", "v_proj", "o_proj"])
    _error(tmp_path / "ad", "'o_proj'", "no tensors", "remove it from target_modules")


def test_error_tensor_for_untargeted_module(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", target_modules=["q_proj"])
    _error(tmp_path / "ad", peft_key(0, "v_proj", "A"), "target_modules", "add 'v_proj'")


def test_error_lora_a_without_lora_b(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    key = peft_key(2, "v_proj", "B")
    _edit_tensors(tmp_path / "ad", lambda t: t.pop(key))
    _error(tmp_path / "ad", repr(key), "missing", "lora_A is present", "re-save")


def test_error_shape_mismatch(tmp_path: Path) -> None:
    _write(tmp_path / "ad")
    key = peft_key(1, "q_proj", "B")
    _edit_tensors(tmp_path / "ad", lambda t: t.update({key: torch.zeros(4096, 4)}))
    _error(tmp_path / "ad", repr(key), "[4096, 4]", f"expected [{TINY.q_size}, 4]", "another base model")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_error_non_finite(tmp_path: Path, bad: float) -> None:
    _write(tmp_path / "ad")
    key = peft_key(3, "q_proj", "A")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][1, 2] = bad

    _edit_tensors(tmp_path / "ad", poison)
    _error(tmp_path / "ad", repr(key), "NaN or Inf", "retrain or re-export")


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"r": 0}, ("r=0", "positive integer", "fix r")),
        ({"lora_alpha": "x"}, ("lora_alpha='x'", "finite number", "fix lora_alpha")),
        ({"target_modules": 3}, ("target_modules=3", "fix target_modules")),
        ({"layers_to_transform": "x"}, ("layers_to_transform='x'", "fix layers_to_transform")),
        ({"target_modules": "(.*"}, ("target_modules regex '(.*'", "invalid", "fix the pattern")),
        ({"target_modules": "all-linear", "layers_to_transform": [0]}, ("layers_to_transform", "PEFT rejects that too")),
    ],
)
def test_error_bad_field(tmp_path: Path, changes: dict, needles: tuple[str, ...]) -> None:
    _write(tmp_path / "ad")
    _edit_config(tmp_path / "ad", **changes)
    _error(tmp_path / "ad", *needles)
