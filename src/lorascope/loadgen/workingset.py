"""What a popularity law implies for the working set: printed beside every cell's measurements.

All functions take p, a pmf over adapter indices (e.g. ``parse_traffic("zipf:1.5").probabilities(N)``).
c is the number of independent draws, e.g. the requests in flight at concurrency c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _pmf(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or len(p) == 0 or (p < 0).any() or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-6):
        raise ValueError("p must be a non-empty 1-D array of probabilities summing to 1")
    return p


def expected_distinct(p: np.ndarray, c: int) -> float:
    """Expected number of distinct adapters among c independent draws: sum_k 1 - (1 - p_k)^c."""
    p = _pmf(p)
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    if c == 0:
        return 0.0
    # -expm1(c * log1p(-p)) keeps precision when p_k is tiny and c large; p_k = 1 gives log1p(-1) = -inf.
    with np.errstate(divide="ignore"):
        return float(-np.expm1(c * np.log1p(-p)).sum())


def sample_distinct(p: np.ndarray, c: int, rng: np.random.Generator, samples: int = 10_000) -> np.ndarray:
    """Monte Carlo: the number of distinct adapters in each of `samples` independent groups of c draws."""
    p = _pmf(p)
    if c <= 0:
        return np.zeros(samples, dtype=np.int64)
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    out = np.empty(samples, dtype=np.int64)
    chunk = max(1, 2_000_000 // c)  # bound memory to ~16 MB of draws at a time
    for lo in range(0, samples, chunk):
        m = min(chunk, samples - lo)
        draws = np.sort(np.searchsorted(cdf, rng.random((m, c)), side="right"), axis=1)
        out[lo : lo + m] = 1 + (np.diff(draws, axis=1) != 0).sum(axis=1)
    return out


def distinct_quantile(p: np.ndarray, c: int, q: float, rng: np.random.Generator | None = None, samples: int = 10_000) -> int:
    """The q-quantile (e.g. 0.9) of the distinct adapters among c draws, by Monte Carlo.

    Returns the smallest d with P(distinct <= d) >= q in the sample (an integer, so it can size
    max_loras directly). rng None = a fixed seed (0), so the printed figure is reproducible.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    counts = sample_distinct(p, c, np.random.default_rng(0) if rng is None else rng, samples)
    return int(np.quantile(counts, q, method="inverted_cdf"))


def adapters_for_share(p: np.ndarray, share: float) -> int:
    """Fewest adapters that together carry at least `share` of the traffic (the hottest ones)."""
    p = _pmf(p)
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if share == 0:
        return 0
    cum = np.cumsum(np.sort(p)[::-1])
    # Tolerance so that e.g. 5 of 10 uniform adapters count as carrying 50% despite float rounding.
    return min(int(np.searchsorted(cum, share - 1e-9, side="left")) + 1, len(p))


def top_share(p: np.ndarray, fraction: float) -> float:
    """Share of traffic on the hottest ceil(fraction * N) adapters (e.g. fraction 0.05 = top 5%)."""
    p = _pmf(p)
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = math.ceil(fraction * len(p) - 1e-9)
    return float(np.sort(p)[::-1][:k].sum())


@dataclass(frozen=True, slots=True)
class WorkingSet:
    """The figures printed with every cell."""

    n: int
    c: int
    expected_distinct: float
    p90_distinct: int
    adapters_for_50: int
    adapters_for_90: int
    top5_share: float

    def line(self) -> str:
        return (f"N={self.n} c={self.c}: expected distinct {self.expected_distinct:.1f}, p90 {self.p90_distinct}; "
                f"{self.adapters_for_50} adapters carry 50%, {self.adapters_for_90} carry 90%; "
                f"top 5% carry {100 * self.top5_share:.1f}%")


def working_set(p: np.ndarray, c: int, rng: np.random.Generator | None = None, samples: int = 10_000) -> WorkingSet:
    """All the working-set figures of a law at concurrency c."""
    p = _pmf(p)
    return WorkingSet(len(p), c, expected_distinct(p, c), distinct_quantile(p, c, 0.9, rng, samples),
                      adapters_for_share(p, 0.5), adapters_for_share(p, 0.9), top_share(p, 0.05))
