"""Workloads: every law samples its pmf, arrivals and lengths have their moments, traces round-trip,
parse errors name the bad part, and one seed gives one workload."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lorascope.loadgen.workload import (
    Drift,
    HotSet,
    Power,
    Uniform,
    Zipf,
    build_workload,
    load_trace,
    parse_arrival,
    parse_lengths,
    parse_traffic,
    save_trace,
)

SAMPLES = 200_000
Z = 5.5  # per-cell z bound: over <= 1000 cells a false alarm has probability < 1e-4; seeds are fixed anyway


def assert_matches_pmf(idx: np.ndarray, p: np.ndarray, label: str) -> None:
    """Frequencies match p: every cell within Z binomial standard errors, and chi-square within df + 6*sqrt(2 df)."""
    n = len(idx)
    counts = np.bincount(idx, minlength=len(p))
    assert len(counts) == len(p) and idx.min() >= 0, f"{label}: index out of range"
    assert (counts[p == 0] == 0).all(), f"{label}: sampled an adapter of probability 0"
    freq, live = counts / n, p > 0
    se = np.sqrt(p[live] * (1 - p[live]) / n)
    z = np.abs(freq[live] - p[live]) / np.maximum(se, 1e-300)
    assert z.max() <= Z, f"{label}: a frequency is {z.max():.2f} standard errors from its pmf (tolerance {Z})"
    df = max(live.sum() - 1, 0)
    chi2 = float(((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum())
    bound = df + 6 * math.sqrt(2 * df)
    assert chi2 <= bound + 1e-9, f"{label}: chi-square {chi2:.1f} over bound {bound:.1f} (df {df})"


LAWS = ["uniform", "zipf:1.5", "zipf:0.8", "power:0.5", "power:2", "hotset:0.05:0.9", "hotset:0.2:0.8"]


@pytest.mark.parametrize("n", [1, 10, 1000])
@pytest.mark.parametrize("spec", LAWS)
def test_sampled_frequencies_match_the_pmf(spec: str, n: int) -> None:
    law = parse_traffic(spec)
    p = law.probabilities(n)
    assert p.shape == (n,) and math.isclose(p.sum(), 1.0, rel_tol=1e-12), f"{spec}: pmf does not sum to 1"
    assert_matches_pmf(law.sample(n, SAMPLES, np.random.default_rng(7)), p, f"{spec} N={n}")


@pytest.mark.parametrize("s", [0.0, 0.8, 1.5, 3.0])
def test_zipf_pmf_is_exactly_k_to_the_minus_s_over_the_harmonic_number(s: float) -> None:
    n = 1000
    h = math.fsum(k**-s for k in range(1, n + 1))
    expected = np.array([k**-s / h for k in range(1, n + 1)])
    np.testing.assert_allclose(Zipf(s).probabilities(n), expected, rtol=1e-12, err_msg="zipf pmf != k^-S / H(N,S) (rtol 1e-12)")


@pytest.mark.parametrize("a", [0.3, 1.0, 2.5])
def test_power_is_numpy_power_floored_as_in_s_lora(a: float) -> None:
    n = 1000
    idx = Power(a).sample(n, SAMPLES, np.random.default_rng(3))
    raw = np.random.default_rng(3).power(a, SAMPLES)
    np.testing.assert_array_equal(idx, np.minimum(np.floor(n * raw), n - 1).astype(np.int64), "not floor(N * power(A))")
    # E[floor(N X)] = sum_{i=1}^{N-1} P(X >= i/N) = sum_i 1 - (i/N)^A, exactly.
    mean = math.fsum(1 - (i / n) ** a for i in range(1, n))
    assert math.isclose(float(np.arange(n) @ Power(a).probabilities(n)), mean, rel_tol=1e-9), "pmf mean != analytical mean"
    tol = 5 * idx.std() / math.sqrt(SAMPLES)
    assert abs(idx.mean() - mean) <= tol, f"sample mean {idx.mean():.2f} vs analytical {mean:.2f} (tolerance 5 SE = {tol:.2f})"
    # Which end is hot, as S-LoRA: A < 1 -> index 0, A > 1 -> index N-1.
    p = Power(a).probabilities(n)
    if a < 1:
        assert p.argmax() == 0
    elif a > 1:
        assert p.argmax() == n - 1


@pytest.mark.parametrize(("f", "share", "n", "hot"), [(0.05, 0.9, 1000, 50), (0.07, 0.5, 100, 7), (0.2, 0.8, 10, 2), (0.5, 0.7, 3, 2)])
def test_hotset_gives_share_p_to_the_first_ceil_fn_adapters(f: float, share: float, n: int, hot: int) -> None:
    p = HotSet(f, share).probabilities(n)
    assert math.isclose(p[:hot].sum(), share) and np.ptp(p[:hot]) < 1e-15 and np.ptp(p[hot:]) < 1e-15, "hot set size or split wrong"
    idx = HotSet(f, share).sample(n, SAMPLES, np.random.default_rng(11))
    got, tol = (idx < hot).mean(), 5 * math.sqrt(share * (1 - share) / SAMPLES)
    assert abs(got - share) <= tol, f"hot share {got:.4f} vs P={share} (tolerance 5 SE = {tol:.4f})"


def test_hotset_of_every_adapter_is_uniform() -> None:
    np.testing.assert_allclose(HotSet(1.0, 0.3).probabilities(4), np.full(4, 0.25))


def test_drift_moves_the_hot_set_and_each_period_matches_its_rotated_pmf() -> None:
    n, period, epochs = 100, 50_000, 4
    law = parse_traffic(f"drift:zipf:1.5:{period}")
    assert isinstance(law, Drift) and law.spec == f"drift:zipf:1.5:{period}"
    np.testing.assert_array_equal(law.probabilities(n, 0), Zipf(1.5).probabilities(n), "epoch 0 is not the inner law")
    pmfs = [law.probabilities(n, e * period) for e in range(epochs)]
    for e, p in enumerate(pmfs):
        np.testing.assert_array_equal(np.sort(p), np.sort(pmfs[0]), f"epoch {e} is not a relabelling of the law")
        np.testing.assert_array_equal(law.probabilities(n, (e + 1) * period - 1), p, "pmf changed inside an epoch")
    hot_sets = [frozenset(np.argsort(p)[-5:].tolist()) for p in pmfs]
    assert len(set(hot_sets)) == epochs, "the top-5 adapters did not move between periods"
    idx = law.sample(n, period * epochs, np.random.default_rng(5))
    for e, p in enumerate(pmfs):
        assert_matches_pmf(idx[e * period : (e + 1) * period], p, f"drift epoch {e}")
    # start= continues the request index: a sample from the middle of epoch 2 follows epoch 2's pmf.
    assert_matches_pmf(law.sample(n, 40_000, np.random.default_rng(6), start=2 * period), pmfs[2], "drift start=")


@pytest.mark.parametrize(("spec", "cv"), [("poisson", 1.0), ("gamma:2", 2.0), ("gamma:0.5", 0.5), ("constant", 0.0)])
def test_arrivals_have_mean_gap_one_over_rate_and_their_cv(spec: str, cv: float) -> None:
    rate, count = 4.0, SAMPLES
    t = parse_arrival(spec).intended_send_times(rate, count, np.random.default_rng(2))
    assert len(t) == count and t[0] == 0 and (np.diff(t) >= 0).all(), "send times must start at 0 and not decrease"
    gaps = np.diff(t)
    assert abs(gaps.mean() * rate - 1) <= 0.02, f"{spec}: mean gap {gaps.mean():.4f} vs {1 / rate} (tolerance 2%)"
    got = gaps.std() / gaps.mean()
    assert abs(got - cv) <= 0.05 * max(cv, 1e-9) + 1e-9, f"{spec}: CV {got:.4f} vs {cv} (tolerance 5%)"
    if spec == "constant":
        np.testing.assert_allclose(t, np.arange(count) / rate, rtol=1e-9, err_msg="constant arrivals are not k/rate")


@pytest.mark.parametrize(
    ("spec", "mean", "std"),
    [("128", 128, 0), ("fixed:7", 7, 0), ("uniform:8:512", 260, math.sqrt((505**2 - 1) / 12)), ("normal:100:10", 100, 10),
     ("lognormal:128:0.5", 128, 128 * math.sqrt(math.exp(0.25) - 1))],
)
def test_lengths_have_their_mean_and_std(spec: str, mean: float, std: float) -> None:
    x = parse_lengths(spec).sample(SAMPLES, np.random.default_rng(4))
    assert x.dtype == np.int64 and x.min() >= 1, "lengths must be int64 >= 1"
    assert abs(x.mean() - mean) <= 0.01 * mean, f"{spec}: mean {x.mean():.2f} vs {mean} (tolerance 1%)"
    assert abs(x.std() - std) <= 0.02 * std + 0.3, f"{spec}: std {x.std():.2f} vs {std:.2f} (tolerance 2% + 0.3 for rounding)"
    if spec.startswith("uniform"):
        assert (x.min(), x.max()) == (8, 512), "uniform:LO:HI is inclusive at both ends"


def test_normal_lengths_are_clipped_to_one() -> None:
    x = parse_lengths("normal:2:5").sample(10_000, np.random.default_rng(0))
    assert x.min() == 1 and (x == 1).mean() > 0.3


@pytest.mark.parametrize(
    ("parse", "spec", "needle"),
    [(parse_traffic, "zipf", "zipf takes 1"), (parse_traffic, "zipf:abc", "'abc' is not a number"),
     (parse_traffic, "pareto:2", "unknown law 'pareto'"), (parse_traffic, "power:-1", "A=-1 must be > 0"),
     (parse_traffic, "hotset:0.1", "hotset takes 2"), (parse_traffic, "hotset:0:0.9", "F=0 must be in (0, 1]"),
     (parse_traffic, "hotset:0.1:1.5", "P=1.5 must be in [0, 1]"), (parse_traffic, "drift:zipf:1.5", "period '1.5' is not an integer"),
     (parse_traffic, "drift:uniform:0", "period '0' must be >= 1"), (parse_traffic, "zipf:nan", "must be finite"),
     (parse_arrival, "gamma", "gamma takes one"), (parse_arrival, "gamma:0", "use constant"),
     (parse_arrival, "bursty", "unknown arrival process 'bursty'"), (parse_lengths, "0", "lengths must be >= 1"),
     (parse_lengths, "uniform:9:3", "LO <= HI"), (parse_lengths, "normal:100", "normal takes 2"),
     (parse_lengths, "lognormal:0:1", "MEAN=0 must be > 0"), (parse_lengths, "fixed:1.5", "'1.5' is not an integer")],
)
def test_parse_errors_name_the_bad_spec_and_the_accepted_forms(parse, spec: str, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(spec)
    assert needle in str(err.value) and "accepted:" in str(err.value), str(err.value)


def test_specs_round_trip_through_their_spelling() -> None:
    for spec in ["uniform", "zipf:1.5", "power:0.5", "hotset:0.05:0.9", "drift:zipf:1.5:200"]:
        assert parse_traffic(spec).spec == spec
    assert isinstance(parse_traffic(" Uniform "), Uniform)
    for spec in ["poisson", "gamma:2", "constant"]:
        assert parse_arrival(spec).spec == spec
    assert parse_lengths(128).spec == "fixed:128" and parse_lengths("uniform:1:9").spec == "uniform:1:9"


def test_same_seed_same_workload_other_seed_other_workload() -> None:
    kw = dict(n_adapters=1000, traffic="zipf:1.5", count=2000, input_lens="uniform:16:256", output_lens="lognormal:128:0.5",
              rate=5.0, arrival="gamma:2")
    a, b, c = build_workload(seed=1, **kw), build_workload(seed=1, **kw), build_workload(seed=2, **kw)
    assert a.same_as(b) and [r.prompt_token_ids for r in a][:50] == [r.prompt_token_ids for r in b][:50]
    assert not a.same_as(c) and not np.array_equal(a.adapter, c.adapter) and a.prompt_token_ids(0) != c.prompt_token_ids(0)
    # Each part has its own stream: another arrival process or law leaves the other parts unchanged.
    d = build_workload(seed=1, **(kw | {"arrival": "poisson"}))
    assert np.array_equal(a.adapter, d.adapter) and np.array_equal(a.input_len, d.input_len) and not a.same_as(d)
    e = build_workload(seed=1, **(kw | {"traffic": "uniform"}))
    assert np.array_equal(a.send_time_s, e.send_time_s) and np.array_equal(a.output_len, e.output_len)


def test_golden_values_pin_the_streams_across_machines() -> None:
    # If these change, one seed no longer gives the same workload (a numpy stream change): say so in RESULTS.md.
    w = build_workload(1000, "zipf:1.5", 8, 128, 128, seed=0)
    assert w.adapter.tolist() == [1, 0, 2, 0, 0, 0, 0, 0]
    assert w.prompt_token_ids(0)[:6] == [16709, 28471, 31774, 17828, 9694, 25629]
    w = build_workload(1000, "uniform", 4, "uniform:1:1000", 128, seed=0, rate=2.0)
    assert w.adapter.tolist() == [449, 391, 576, 289] and w.input_len.tolist() == [250, 993, 776, 451]


def test_workload_requests_closed_loop_and_prompts() -> None:
    w = build_workload(10, "uniform", 100_000, "uniform:1:64", 32, seed=3, vocab_size=500, token_low=3)
    assert w.send_time_s is None and len(w) == 100_000 and w.meta["arrival"] is None
    r = w.request(12_345)
    assert r.index == 12_345 and r.intended_send_s is None and r.output_len == 32
    assert len(r.prompt_token_ids) == r.input_len and all(3 <= t < 500 for t in r.prompt_token_ids)
    assert r.prompt_token_ids == w.prompt_token_ids(12_345), "prompts must be a pure function of (prompt_seed, index)"
    open_loop = build_workload(10, "uniform", 10, 8, 8, seed=3, rate=1.0)
    assert open_loop.meta["arrival"] == "poisson" and open_loop.request(0).intended_send_s == 0.0


def test_base_share_sends_requests_to_the_base_model() -> None:
    w = build_workload(10, "uniform", SAMPLES, 8, 8, seed=1, base_share=0.25)
    got, tol = (w.adapter == -1).mean(), 5 * math.sqrt(0.25 * 0.75 / SAMPLES)
    assert abs(got - 0.25) <= tol, f"base share {got:.4f} vs 0.25 (tolerance {tol:.4f})"
    assert (build_workload(0, "uniform", 100, 8, 8, seed=1, base_share=1.0).adapter == -1).all()


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"n_adapters": 0}, "n_adapters must be >= 1"), ({"seed": -1}, "seeds must be >= 0"), ({"arrival": "poisson"}, "needs a rate"),
     ({"base_share": 1.5}, "base_share"), ({"rate": -2.0}, "positive"), ({"token_low": 10, "vocab_size": 10}, "token_low")],
)
def test_build_workload_rejects_bad_arguments(kw: dict, needle: str) -> None:
    args = dict(n_adapters=10, traffic="uniform", count=10, input_lens=8, output_lens=8, seed=0) | kw
    with pytest.raises(ValueError, match=needle):
        build_workload(**args)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_trace_round_trip(tmp_path, suffix: str) -> None:
    w = build_workload(50, "zipf:1.2", 500, "normal:64:20", "uniform:1:9", seed=9, rate=3.0, base_share=0.1, vocab_size=1000)
    path = tmp_path / f"trace{suffix}"
    save_trace(w, path)
    back = load_trace(path, vocab_size=1000, prompt_seed=9)
    assert back.same_as(w), "trace did not round-trip exactly"
    assert back.n_adapters == int(w.adapter.max()) + 1


def test_save_trace_needs_send_times(tmp_path) -> None:
    with pytest.raises(ValueError, match="closed-loop"):
        save_trace(build_workload(5, "uniform", 5, 8, 8, seed=0), tmp_path / "t.csv")


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [("a.csv", "time_s,adapter,input_len\n0,1,5\n", "line 1: header lacks column 'output_len'"),
     ("b.csv", "time_s,adapter,input_len,output_len\n0,1,5,5\n1,,5,5\n", "line 3: missing column 'adapter'"),
     ("c.csv", "time_s,adapter,input_len,output_len\n0,1,x,5\n", "line 2: column 'input_len' = 'x' is not a number"),
     ("d.csv", "time_s,adapter,input_len,output_len\n0,1,0,5\n", "line 2: column 'input_len' = '0' must be an integer >= 1"),
     ("e.csv", "time_s,adapter,input_len,output_len\n2,1,5,5\n1,1,5,5\n", "line 3: time_s 1.0 is before"),
     ("f.jsonl", json.dumps({"time_s": 0, "adapter": 0, "input_len": 4, "output_len": 4}) + "\n\n{\"time_s\": 1, \"adapter\": 2, \"input_len\": 4}\n",
      "line 3: missing column 'output_len'"),
     ("g.jsonl", "{not json\n", "line 1: not JSON"), ("h.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
     ("i.jsonl", json.dumps({"time_s": 0, "adapter": -2, "input_len": 4, "output_len": 4}) + "\n", "'adapter' = -2 must be an integer >= -1")],
)
def test_trace_errors_name_the_file_line_and_column(tmp_path, name: str, text: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_trace(path)
    assert str(path) in str(err.value) and needle in str(err.value), str(err.value)


def test_the_pmf_check_can_fail() -> None:
    idx = Zipf(1.5).sample(100, SAMPLES, np.random.default_rng(1))
    with pytest.raises(AssertionError):
        assert_matches_pmf(idx, Zipf(1.4).probabilities(100), "zipf 1.5 vs 1.4")
    with pytest.raises(AssertionError):
        assert_matches_pmf(Drift(Zipf(1.5), 1000).sample(100, 2000, np.random.default_rng(1), start=1000), Zipf(1.5).probabilities(100), "epoch 1 vs 0")


def test_drift_relabels_across_an_epoch_boundary() -> None:
    law, n = Drift(Zipf(1.5), 10, seed=3), 50
    got = law.sample(n, 25, np.random.default_rng(8), start=7)  # requests 7..31: epochs 0, 1, 2, 3
    inner = Zipf(1.5).sample(n, 25, np.random.default_rng(8))
    want = [law.permutation(n, (7 + i) // 10)[k] for i, k in enumerate(inner)]
    assert got.tolist() == want
    assert law.permutation(n, 1).tolist() != law.permutation(n, 2).tolist() != list(range(n))
