"""The working-set model: expected distinct adapters agrees with Monte Carlo, quantiles with the exact
occupancy distribution, shares with hand-checked cases and the Zipf-1.5 / N=1000 figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorascope.loadgen.workingset import (
    adapters_for_share,
    distinct_quantile,
    expected_distinct,
    sample_distinct,
    top_share,
    working_set,
)
from lorascope.loadgen.workload import parse_traffic


def _monte_carlo_distinct(p: np.ndarray, c: int, samples: int, rng: np.random.Generator) -> float:
    # Independent of the module's sampler: numpy's choice, then distinct values per row.
    draws = np.sort(rng.choice(len(p), size=(samples, c), p=p), axis=1)
    return float((1 + (np.diff(draws, axis=1) != 0).sum(axis=1)).mean())


@pytest.mark.parametrize("n", [1, 10, 1000])
@pytest.mark.parametrize("spec", ["uniform", "zipf:1.5", "hotset:0.2:0.8"])
def test_expected_distinct_matches_monte_carlo(spec: str, n: int) -> None:
    p = parse_traffic(spec).probabilities(n)
    rng = np.random.default_rng(n)
    for c in (1, 8, 32, 256):
        exact, mc = expected_distinct(p, c), _monte_carlo_distinct(p, c, 3000, rng)
        assert abs(exact - mc) <= 0.02 * mc, f"{spec} N={n} c={c}: formula {exact:.3f} vs Monte Carlo {mc:.3f} (tolerance 2%)"
        mine = sample_distinct(p, c, rng, 3000).mean()
        assert abs(exact - mine) <= 0.02 * mine, f"{spec} N={n} c={c}: formula {exact:.3f} vs sample_distinct {mine:.3f} (tolerance 2%)"


def test_expected_distinct_hand_cases() -> None:
    assert expected_distinct(np.array([0.5, 0.5]), 2) == pytest.approx(1.5)
    assert expected_distinct(np.array([1.0]), 1000) == 1.0
    assert expected_distinct(np.array([1.0, 0.0]), 5) == 1.0
    assert expected_distinct(np.full(4, 0.25), 0) == 0.0
    assert expected_distinct(np.full(1000, 1e-3), 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="summing to 1"):
        expected_distinct(np.array([0.5, 0.4]), 3)


def _uniform_occupancy_cdf(n: int, c: int) -> np.ndarray:
    # P(D = d) = C(n, d) * S2(c, d) * d! / n^c, S2 the Stirling numbers of the second kind.
    def s2(m: int, k: int) -> int:
        return sum((-1) ** j * math.comb(k, j) * (k - j) ** m for j in range(k + 1)) // math.factorial(k)

    return np.cumsum([math.comb(n, d) * s2(c, d) * math.factorial(d) / n**c for d in range(c + 1)])


@pytest.mark.parametrize(("n", "c"), [(10, 8), (20, 12), (5, 30)])
def test_distinct_quantile_matches_the_exact_uniform_occupancy(n: int, c: int) -> None:
    cdf = _uniform_occupancy_cdf(n, c)
    p = np.full(n, 1.0 / n)
    for q in (0.5, 0.9):
        exact = int(np.searchsorted(cdf, q - 1e-12))  # smallest d with P(D <= d) >= q
        assert distinct_quantile(p, c, q, np.random.default_rng(1), 20_000) == exact, f"N={n} c={c} q={q}: exact {exact} (cdf {cdf.round(4)})"


def test_distinct_quantile_edges_and_reproducibility() -> None:
    assert distinct_quantile(np.array([1.0]), 64, 0.9) == 1
    assert distinct_quantile(np.full(1000, 1e-3), 1, 0.9) == 1
    p = parse_traffic("zipf:1.5").probabilities(1000)
    assert distinct_quantile(p, 32, 0.9) == distinct_quantile(p, 32, 0.9), "rng None must mean a fixed seed"
    with pytest.raises(ValueError, match="q must be"):
        distinct_quantile(p, 32, 1.5)


def test_adapters_for_share_hand_cases() -> None:
    p = np.array([0.2, 0.5, 0.3])  # unsorted on purpose
    assert [adapters_for_share(p, s) for s in (0, 0.5, 0.8, 0.81, 1.0)] == [0, 1, 2, 3, 3]
    u = np.full(10, 0.1)
    assert adapters_for_share(u, 0.5) == 5 and adapters_for_share(u, 0.9) == 9, "float rounding must not add an adapter"
    with pytest.raises(ValueError, match="share"):
        adapters_for_share(u, 1.1)


def test_top_share_hand_cases() -> None:
    p = np.array([0.2, 0.5, 0.3])
    assert top_share(p, 1 / 3) == pytest.approx(0.5) and top_share(p, 0.5) == pytest.approx(0.8) and top_share(p, 1) == pytest.approx(1)
    assert top_share(p, 0) == 0 and top_share(np.full(20, 0.05), 0.05) == pytest.approx(0.05)


def test_zipf_1_5_over_1000_figures() -> None:
    # BACKGROUND.md: the study's "top 5% get about half" is wrong; it is ~91%.
    p = parse_traffic("zipf:1.5").probabilities(1000)
    h = math.fsum(k**-1.5 for k in range(1, 1001))
    top5 = math.fsum(k**-1.5 for k in range(1, 51)) / h
    assert top_share(p, 0.05) == pytest.approx(top5, rel=1e-12) and 0.914 < top5 < 0.9145, f"top 5% share {top5}"
    assert adapters_for_share(p, 0.5) == 2 and adapters_for_share(p, 0.9) == 40
    assert expected_distinct(p, 32) == pytest.approx(13.2267, abs=1e-4)
    ws = working_set(p, 32)
    assert (ws.adapters_for_50, ws.adapters_for_90, ws.p90_distinct) == (2, 40, 16)
    assert "top 5% carry 91.4%" in ws.line() and "expected distinct 13.2" in ws.line(), ws.line()
