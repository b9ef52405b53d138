"""Models: `lorascope model save` writes a directory transformers loads (tokenizer and logits match
ours), loading errors name what is wrong, preset shapes and deterministic random weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorascope import LLM, SamplingParams
from lorascope.cli import app
from lorascope.model.config import ModelConfigError
from lorascope.model.tokenizer import TextTokenizer
from lorascope.model.weights import load_model, resolve_config

TEXTS = ["hello", "Hello, world! 123", "héllo wörld ✓ 🙂", "  two  spaces\nand a newline\t"]


@pytest.fixture(scope="module")
def saved_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-mistral"
    result = CliRunner().invoke(app, ["model", "save", "tiny-mistral", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_cli_model_save_writes_hf_directory(saved_mistral: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (saved_mistral / name).is_file(), f"{name} missing"
    config = json.loads((saved_mistral / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["sliding_window"] == 48
    assert resolve_config(str(saved_mistral)) == resolve_config("tiny-mistral")
    # the saved weights are the preset's weights
    ours = load_model("tiny-mistral").model.state_dict()
    saved = load_file(str(saved_mistral / "model.safetensors"))
    assert saved.keys() == ours.keys()
    for key, tensor in saved.items():
        assert torch.equal(tensor, ours[key]), key


def test_cli_model_save_unknown_preset(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["model", "save", "nope", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "nope" in result.output and "tiny" in result.output
    assert not (tmp_path / "x").exists()


def test_transformers_tokenizer_matches_builtin(saved_mistral: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved_mistral)
    ours = TextTokenizer.builtin()
    cfg = resolve_config("tiny-mistral")
    assert len(hf) == cfg.vocab_size
    assert hf.convert_tokens_to_ids(hf.bos_token) == cfg.bos_token_id
    assert hf.convert_tokens_to_ids(hf.eos_token) == cfg.eos_token_id[0]
    assert hf("hello", add_special_tokens=False).input_ids == ours.encode("hello", add_bos=False) == list(b"hello")
    for text in TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert hf(text, add_special_tokens=False).input_ids == ids, text
        assert hf.decode(ids) == ours.decode(ids) == text
    assert ours.encode("hi") == [cfg.bos_token_id, *b"hi"]


def _engine_last_logits(path: Path, prompt: list[int], **engine_args) -> torch.Tensor:
    llm = LLM(str(path), num_kv_blocks=64, max_model_len=256, **engine_args)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, return_logits=True))[0]
    llm.close()
    assert len(out.logits) == 1
    return out.logits[0]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-mistral"])
def test_transformers_logits_match_engine(preset: str, model_dir) -> None:
    """70 tokens: past tiny-mistral's 48-token sliding window. Also chunked prefill over small pages."""
    from transformers import AutoModelForCausalLM

    path = model_dir(preset)
    cfg = resolve_config(preset)
    prompt = torch.randint(0, cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    if preset == "tiny-mistral":
        assert hf.config.sliding_window == 48
    with torch.inference_mode():
        want = hf(torch.tensor([prompt])).logits[0, -1].float()
    for args in ({}, {"max_num_batched_tokens": 16, "block_size": 4}):
        got = _engine_last_logits(path, prompt, **args)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-5, f"{preset} {args}: relative error {rel:.2e}"
        assert int(got.argmax()) == int(want.argmax())


def test_sliding_window_matters(model_dir) -> None:
    """Guard for the mistral case: with the window removed, the logits after 70 tokens change."""
    prompt = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    path = model_dir("tiny-mistral")
    windowed = _engine_last_logits(path, prompt)
    llm = LLM(str(path), num_kv_blocks=64, max_model_len=256)
    model = llm.engine.runner.model
    model.cfg = dataclasses.replace(model.cfg, sliding_window=None)  # the runner reads the window from here
    full = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, return_logits=True))[0].logits[0]
    llm.close()
    assert ((full - windowed).norm() / windowed.norm()).item() > 1e-3


# --- loading errors ----------------------------------------------------------------------------


@pytest.fixture
def tiny_copy(model_dir, tmp_path: Path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(model_dir("tiny"), out)
    return out


def test_load_saved_dir_equals_preset(tiny_copy: Path) -> None:
    loaded = load_model(str(tiny_copy))
    assert loaded.name == "tiny" and loaded.tokenizer is not None
    preset = load_model("tiny").model.state_dict()
    for key, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, preset[key]), key


def test_missing_tensor_is_named(tiny_copy: Path) -> None:
    file = tiny_copy / "model.safetensors"
    state = load_file(str(file))
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, str(file))
    with pytest.raises(ModelConfigError, match=r"missing tensors \['model\.layers\.2\.mlp\.up_proj\.weight'\]"):
        load_model(str(tiny_copy))


def test_wrong_shape_is_named(tiny_copy: Path) -> None:
    file = tiny_copy / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 128)
    save_file(state, str(file))
    with pytest.raises(
        ModelConfigError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 128\).*\(64, 128\)"
    ):
        load_model(str(tiny_copy))


def test_unexpected_tensor_is_named(tiny_copy: Path) -> None:
    file = tiny_copy / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, str(file))
    with pytest.raises(ModelConfigError, match=r"unexpected tensor 'model\.layers\.9\.extra\.weight'"):
        load_model(str(tiny_copy))


def test_no_safetensors(tiny_copy: Path) -> None:
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(ModelConfigError, match=r"no \*\.safetensors file"):
        load_model(str(tiny_copy))


def test_unknown_model_type_is_named(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=r"'gpt2' is not supported.*llama, mistral, qwen2"):
        load_model(str(tiny_copy))


def test_missing_config_field_is_named(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    del config["hidden_size"]
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="'hidden_size'"):
        load_model(str(tiny_copy))


def test_resolve_unknown_model_names_presets_and_save() -> None:
    with pytest.raises(ModelConfigError) as info:
        resolve_config("nope")
    message = str(info.value)
    assert "'nope'" in message and "lorascope model save" in message
    for preset in ("tiny", "tiny-qwen2", "tiny-mistral", "llama-3.1-8b"):
        assert preset in message


# --- presets and random weights ----------------------------------------------------------------


def test_llama_8b_preset_parameter_count() -> None:
    n = resolve_config("llama-3.1-8b").num_parameters()
    assert abs(n - 8.03e9) / 8.03e9 < 0.01, n


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-mistral"])
def test_num_parameters_counts_the_model(preset: str) -> None:
    model = load_model(preset).model
    assert sum(p.numel() for p in model.parameters()) == resolve_config(preset).num_parameters()


def test_random_init_is_deterministic_and_seeded() -> None:
    a = load_model("tiny").model.state_dict()
    b = load_model("tiny").model.state_dict()
    c = load_model("tiny", seed=1).model.state_dict()
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        if key.endswith("norm.weight"):
            assert torch.equal(a[key], c[key]) and torch.all(a[key] == 1), key
        else:
            assert not torch.equal(a[key], c[key]), f"{key}: seed 1 gives seed 0's weights"
            assert a[key].std() > 0, key


def test_bf16_is_float32_rounded() -> None:
    f32 = load_model("tiny").model.state_dict()
    bf16 = load_model("tiny", "bfloat16").model.state_dict()
    for key, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16, key
        assert torch.equal(tensor, f32[key].to(torch.bfloat16)), key
