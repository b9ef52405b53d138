"""SamplingParams validation, the `sample` function (greedy, top-k, top-p, frequencies, min_tokens),
and sampling through the engine: seeds, batch independence, stop tokens, EOS, min_tokens, length."""

from __future__ import annotations

import math

import pytest
import torch

from lorascope import LLM, SamplingParams
from lorascope.engine.sampling import SamplingError, sample

EOS = 257  # the tiny preset's end-of-text id
VOCAB = 260


# --- SamplingParams validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)


def test_sampling_error_is_a_value_error_and_edges_are_valid() -> None:
    assert issubclass(SamplingError, ValueError)
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=-1, min_tokens=1)
    SamplingParams(max_tokens=7, min_tokens=7, top_p=1e-9, top_k=0)
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.01).greedy


# --- the sample function ---------------------------------------------------------------------


def _logits(rows: int = 6, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None = None, n: int = 0) -> list[int]:
    rows = logits.shape[0]
    return sample(logits.clone(), [p] * rows, [gen] * rows, [n] * rows, (EOS,))


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert _sample(logits, SamplingParams(temperature=0)) == logits.argmax(-1).tolist()


def test_top_k_1_is_argmax() -> None:
    logits = _logits(seed=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert _sample(logits, SamplingParams(temperature=1.0, top_k=1), gen) == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = _logits(seed=2) / 3  # flat-ish: without top_p many tokens would come out
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert _sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), gen) == logits.argmax(-1).tolist()


def test_top_k_restricts_to_the_k_largest() -> None:
    logits = _logits(1, seed=3) / 3
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    seen = {_sample(logits, SamplingParams(temperature=1.0, top_k=3), gen)[0] for _ in range(300)}
    assert seen == top3


PROBS = [0.5, 0.3, 0.2]
DRAWS = 20_000


def _frequencies(params: SamplingParams) -> list[float]:
    logits = torch.tensor([PROBS]).log()
    gen = torch.Generator().manual_seed(42)
    counts = [0, 0, 0]
    for _ in range(DRAWS):
        counts[sample(logits.clone(), [params], [gen], [0], ())[0]] += 1
    return [c / DRAWS for c in counts]


def test_sampled_frequencies_match_probabilities() -> None:
    freq = _frequencies(SamplingParams(temperature=1.0))
    for f, p in zip(freq, PROBS, strict=True):
        assert abs(f - p) < 0.02, freq


def test_top_p_drops_the_tail_and_renormalises() -> None:
    freq = _frequencies(SamplingParams(temperature=1.0, top_p=0.6))
    assert freq[2] == 0.0, "top_p=0.6 must drop the third token (0.5 + 0.3 already reach 0.6)"
    assert abs(freq[0] - 0.625) < 0.02 and abs(freq[1] - 0.375) < 0.02, freq


def test_temperature_sharpens() -> None:
    # temperature 0.5 squares the probabilities: 0.25/0.09/0.04 renormalised
    freq = _frequencies(SamplingParams(temperature=0.5))
    want = [p**2 / sum(q**2 for q in PROBS) for p in PROBS]
    for f, p in zip(freq, want, strict=True):
        assert abs(f - p) < 0.02, freq


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0  # EOS is the argmax...
    logits[0, 5] = 9.0  # ...then a stop id...
    logits[0, 7] = 8.0  # ...then an ordinary token
    greedy = SamplingParams(max_tokens=10, min_tokens=3, temperature=0, stop_token_ids=[5])
    for n in range(3):
        assert _sample(logits, greedy, n=n) == [7], f"EOS/stop not masked at {n} generated"
    assert _sample(logits, greedy, n=3) == [EOS], "EOS still masked once min_tokens is reached"
    # ignore_eos: EOS does not end the sequence, so it is not masked (only the stop ids are)
    ignoring = SamplingParams(max_tokens=10, min_tokens=3, temperature=0, stop_token_ids=[5], ignore_eos=True)
    assert _sample(logits, ignoring, n=0) == [EOS]
    # sampled rows are masked too
    gen = torch.Generator().manual_seed(0)
    hot = SamplingParams(max_tokens=10, min_tokens=3, temperature=1.0)
    drawn = {_sample(logits, hot, gen, n=1)[0] for _ in range(200)}
    assert EOS not in drawn
    # masking is per row
    both = sample(logits.repeat(2, 1), [greedy, greedy], [None, None], [0, 3], (EOS,))
    assert both == [7, EOS]


# --- through the engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    llm = LLM("tiny", num_kv_blocks=512, max_model_len=256)
    yield llm
    llm.close()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4 + 3 * i % 17,), generator=gen).tolist() for i in range(n)]


SEEDED_TOKENS = 64


@pytest.fixture(scope="module")
def seeded_runs(llm):
    """The seed-123 request alone (twice), and inside a batch of 8 others (among them the same prompt
    with seed 124 and greedily) whose lengths differ, so the batch around it changes as it decodes."""
    prompt = _prompts(1, seed=5)[0]
    params = SamplingParams(max_tokens=SEEDED_TOKENS, temperature=0.8, seed=123, ignore_eos=True)
    alone = [llm.generate([prompt], params)[0].token_ids for _ in range(2)]
    others = _prompts(6, seed=6)
    other_params = [
        SamplingParams(
            max_tokens=8 + 9 * i, temperature=0.8 if i % 2 else 0.0, seed=i if i % 3 else None, ignore_eos=True
        )
        for i in range(6)
    ]
    batch = [*others[:3], prompt, prompt, *others[3:], prompt]
    batch_params = [
        *other_params[:3],
        SamplingParams(max_tokens=SEEDED_TOKENS, temperature=0.8, seed=124, ignore_eos=True),
        params,
        *other_params[3:],
        SamplingParams(max_tokens=SEEDED_TOKENS, temperature=0.0, ignore_eos=True),
    ]
    outs = llm.generate(batch, batch_params)
    return alone, outs[4].token_ids, outs[3].token_ids, outs[-1].token_ids


def test_fixed_seed_reproduces(seeded_runs) -> None:
    (first, second), _, _, _ = seeded_runs
    assert len(first) == SEEDED_TOKENS and first == second


def test_different_seeds_differ(seeded_runs) -> None:
    (seed_123, _), _, seed_124, greedy = seeded_runs
    assert seed_124 != seed_123, f"seeds 123 and 124 gave the same {SEEDED_TOKENS} tokens"
    assert greedy != seed_123, "temperature 0.8 sampled exactly the greedy sequence: sampling is inert"


def test_seeded_request_is_independent_of_batch(seeded_runs) -> None:
    (alone, _), in_batch, _, _ = seeded_runs
    assert in_batch == alone, "the seeded request's tokens depend on the batch around it"


def test_unseeded_requests_differ(llm) -> None:
    prompt = _prompts(1, seed=8)[0]
    outs = llm.generate([prompt] * 2, SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True))
    assert outs[0].token_ids != outs[1].token_ids


def test_max_tokens_finishes_with_length(llm) -> None:
    for n in (1, 7, 20):
        outs = llm.generate(_prompts(3), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        for o in outs:
            assert len(o.token_ids) == n and o.finish_reason == "length"


def test_stop_token_finishes_with_stop(llm) -> None:
    prompts = _prompts(4, seed=9)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    for prompt, g in zip(prompts, greedy, strict=True):
        first = g.token_ids[0]
        out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first]))[0]
        assert out.token_ids == [first] and out.finish_reason == "stop"
        # a later stop token: the sequence is cut right after it, the stop token included
        if len(set(g.token_ids)) > 1:
            later = next(t for t in g.token_ids if t != first)
            cut = g.token_ids.index(later) + 1
            out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[later]))[0]
            assert out.token_ids == g.token_ids[:cut] and out.finish_reason == "stop"




def test_min_tokens_through_engine_always_gives_exactly_max() -> None:
    llm = LLM("tiny", num_kv_blocks=256, max_model_len=128)  # its own engine: the bug leaves the engine wedged
    prompts = _prompts(5, seed=10)
    try:
        greedy = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
        for prompt, g in zip(prompts, greedy, strict=True):
            # the greedy run's first token as a stop id would end it at 1 token without min_tokens
            params = SamplingParams(max_tokens=20, min_tokens=20, temperature=0, stop_token_ids=[g.token_ids[0]])
            out = llm.generate([prompt], params)[0]
            assert len(out.token_ids) == 20 and out.finish_reason == "length"
            assert g.token_ids[0] not in out.token_ids
        outs = llm.generate(prompts, SamplingParams(max_tokens=20, min_tokens=20, temperature=0))
        assert all(len(o.token_ids) == 20 and o.finish_reason == "length" for o in outs)
    finally:
        llm.close()


@pytest.fixture
def eos_llm():
    """A tiny LLM whose EOS set is swapped for the greedy first token of PROMPT (random weights never emit 257)."""
    llm = LLM("tiny", num_kv_blocks=64, max_model_len=128)
    first = llm.generate([EOS_PROMPT], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    llm.engine.eos_ids = (first,)
    yield llm, first
    llm.close()


EOS_PROMPT = [256, 72, 101, 108, 108, 111]


def test_eos_stops_unless_ignored(eos_llm) -> None:
    llm, eos = eos_llm
    out = llm.generate([EOS_PROMPT], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = llm.generate([EOS_PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.token_ids[0] == eos and out.finish_reason == "length"


def test_min_tokens_holds_off_eos_through_engine(eos_llm) -> None:
    llm, eos = eos_llm
    out = llm.generate([EOS_PROMPT], SamplingParams(max_tokens=10, min_tokens=4, temperature=0))[0]
    assert len(out.token_ids) >= 4 and eos not in out.token_ids[:4]
    assert out.finish_reason == ("stop" if out.token_ids[-1] == eos else "length")


def test_return_logits_shape_and_greedy_consistency(llm) -> None:
    out = llm.generate([_prompts(1)[0]], SamplingParams(max_tokens=5, temperature=0, return_logits=True))[0]
    assert len(out.logits) == 5
    for token, row in zip(out.token_ids, out.logits, strict=True):
        assert row.shape == (VOCAB,) and row.dtype == torch.float32
        assert int(row.argmax()) == token
        assert math.isfinite(float(row.max()))
