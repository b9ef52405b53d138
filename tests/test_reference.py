"""reference_generate against plain no-cache greedy loops over real HF + PEFT models on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lorascope.model.weights import load_model, save_model
from lorascope.reference import ReferenceRequestError, reference_generate

MAX_TOKENS = 8
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32]  # BOS "Hello, "
OTHER_PROMPT = [256, 84, 104, 101]  # BOS "The"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    save_model(load_model("tiny"), out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, name in enumerate(("a", "b"), start=1):
        torch.manual_seed(seed)  # init_lora_weights=False draws A and B from torch's global RNG
        base = AutoModelForCausalLM.from_pretrained(model_dir)  # fresh: get_peft_model wraps it in place
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(root / name)
        paths[name] = root / name
    return paths


@torch.inference_mode()
def _greedy_no_cache(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """The whole sequence through the model at every step: no KV cache to get wrong.

    Returns the tokens and the logits that chose them.
    """
    ids = list(prompt)
    rows = []
    for _ in range(n):
        rows.append(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float())
        ids.append(int(rows[-1].argmax()))
    return ids[len(prompt) :], torch.stack(rows)


def test_base_matches_no_cache_loop(model_dir: Path) -> None:
    [out] = reference_generate(model_dir, {}, [(PROMPT, None)], MAX_TOKENS)
    tokens, logits = _greedy_no_cache(AutoModelForCausalLM.from_pretrained(model_dir), PROMPT, MAX_TOKENS)
    assert out.token_ids == tokens
    # The random-weight base model repeats one token, so the tokens alone would miss most cache bugs.
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)


def test_adapter_matters_and_matches_single_adapter_peft(model_dir: Path, adapters: dict[str, Path]) -> None:
    base_out, a_out = reference_generate(model_dir, adapters, [(PROMPT, None), (PROMPT, "a")], MAX_TOKENS)
    assert a_out.token_ids != base_out.token_ids
    single = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapters["a"])
    tokens, logits = _greedy_no_cache(single, PROMPT, MAX_TOKENS)
    assert a_out.token_ids == tokens
    torch.testing.assert_close(a_out.logits, logits, rtol=1e-4, atol=1e-5)


def test_mixed_requests_come_back_in_input_order(model_dir: Path, adapters: dict[str, Path]) -> None:
    mixed = [(PROMPT, None), (PROMPT, "a"), (OTHER_PROMPT, "b"), (OTHER_PROMPT, "a"), (OTHER_PROMPT, None)]
    outs = reference_generate(model_dir, adapters, mixed, MAX_TOKENS, keep_logits=False)
    alone = [reference_generate(model_dir, adapters, [req], MAX_TOKENS, keep_logits=False)[0] for req in mixed]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    # Distinct outputs, so a permutation of the results could not pass the check above.
    assert len({tuple(o.token_ids) for o in outs}) == len(mixed)
    assert all(o.logits is None and len(o.margins) == MAX_TOKENS for o in outs)


def test_unknown_adapter_is_a_clear_error(model_dir: Path, adapters: dict[str, Path]) -> None:
    with pytest.raises(ReferenceRequestError, match=r"request 1 names adapter 'c'.*known: a, b"):
        reference_generate(model_dir, adapters, [(PROMPT, "a"), (PROMPT, "c")], MAX_TOKENS)


def test_logits_choose_the_tokens(model_dir: Path, adapters: dict[str, Path]) -> None:
    vocab = load_model("tiny").cfg.vocab_size
    for out in reference_generate(model_dir, adapters, [(PROMPT, None), (PROMPT, "b")], MAX_TOKENS):
        assert out.logits is not None
        assert out.logits.shape == (MAX_TOKENS, vocab) and out.logits.dtype == torch.float32
        assert out.logits.argmax(dim=-1).tolist() == out.token_ids
        top2 = out.logits.topk(2, dim=-1).values
        assert out.margins == pytest.approx((top2[:, 0] - top2[:, 1]).tolist())
        assert all(m >= 0 for m in out.margins)
