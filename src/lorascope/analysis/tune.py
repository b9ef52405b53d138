"""`lorascope tune`: recommend max_loras and max_cpu_loras for a traffic shape (docs/tune.md).

Two models, both driven by the popularity law's pmf p over N adapters:

* Device slots (max_loras = L). The c requests in flight are c independent draws from p. Under
  vLLM's scheduler the first L distinct adapters (in arrival order) get a slot; a request whose
  adapter is not among them is skipped and waits, roughly a whole request lifetime, so it lands in
  the TTFT tail. By Monte Carlo we estimate, for every L, the *delayed fraction*: the share of
  requests whose adapter is not among the L admitted ones. The recommendation is the study's p90
  rule (the p90 of the distinct adapters in flight: in 90% of steps every adapter has a slot); with
  a TTFT SLO it is also raised until at most 1% of requests wait (a p99 SLO cannot absorb more).
* Host tier (max_cpu_loras = M). The request stream through an LRU cache of M adapters under the
  independent reference model, with Che's approximation: solve sum_i (1 - exp(-p_i T)) = M for the
  characteristic time T; the hit ratio is sum_i p_i (1 - exp(-p_i T)).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from lorascope.loadgen.workingset import expected_distinct
from lorascope.loadgen.workload import parse_traffic

POLICIES = ("vllm", "fair")
Q_NO_SLO = 0.90  # the study's rule: size max_loras to the p90 active working set
Q_SLO = 0.99  # a p99 TTFT SLO tolerates at most 1% of requests waiting a request lifetime
HOST_HIT_TARGET = 0.99


@dataclass(frozen=True, slots=True)
class SlotRow:
    """One row of the max_loras table: the delayed fraction and the share of steps that overflow."""

    max_loras: int
    delayed_fraction: float  # share of requests whose adapter finds no slot
    overflow_fraction: float  # share of steps (groups of c) with more than L distinct adapters


@dataclass(slots=True)
class Recommendation:
    num_adapters: int
    traffic: str
    concurrency: int
    policy: str
    slo_ttft_ms: float | None
    max_loras: int
    max_cpu_loras: int
    expected_distinct: float
    p90_distinct: int
    p99_distinct: int
    delayed_fraction: float  # at the recommended max_loras
    host_hit_ratio: float  # at the recommended max_cpu_loras (Che's approximation)
    table: list[SlotRow] = field(default_factory=list)  # L = 1 .. min(N, c)
    host_fit: int | None = None  # adapters that fit the host memory budget, when one was given
    explanation: str = ""

    def delayed_at(self, max_loras: int) -> float:
        """The delayed fraction at any L (0 beyond the table: min(N, c) slots never run out)."""
        if max_loras < 1:
            return 1.0
        return 0.0 if max_loras > len(self.table) else self.table[max_loras - 1].delayed_fraction


# ---------------------------------------------------------------------------------------------------
# Device slots: who finds no slot among c in-flight requests.


def _first_seen_ranks(draws: np.ndarray) -> np.ndarray:
    """For a (m, c) array of adapter ids, each entry's adapter's rank by first appearance in its row (0-based)."""
    m, c = draws.shape
    order = np.argsort(draws, axis=1, kind="stable")  # stable: a run's first entry is its earliest position
    ids = np.take_along_axis(draws, order, axis=1)
    start = np.ones((m, c), dtype=bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = np.zeros((m, c), dtype=bool)
    np.put_along_axis(first, order, start, axis=1)  # first[pos] = pos is its adapter's first appearance
    rank_at = np.cumsum(first, axis=1) - 1  # valid at first appearances
    run_start = np.maximum.accumulate(np.where(start, np.arange(c), 0), axis=1)  # sorted index of each run's start
    first_pos = np.take_along_axis(order, run_start, axis=1)
    return np.take_along_axis(rank_at, first_pos, axis=1)


def slot_table(p: np.ndarray, c: int, samples: int = 20_000, seed: int = 0) -> tuple[list[SlotRow], np.ndarray]:
    """Monte Carlo over `samples` groups of c draws: a row per L in 1..min(N, c), and the distinct counts.

    Admitted adapters = the first L distinct adapters of a group in arrival order (vLLM admits first
    come first served and skips a request whose adapter would exceed the cap).
    """
    n = len(p)
    cap = min(n, c)
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    rng = np.random.default_rng(seed)
    rank_counts = np.zeros(c, dtype=np.int64)
    distinct = np.empty(samples, dtype=np.int64)
    chunk = max(1, 1_000_000 // c)
    for lo in range(0, samples, chunk):
        k = min(chunk, samples - lo)
        draws = np.minimum(np.searchsorted(cdf, rng.random((k, c)), side="right"), n - 1)
        ranks = _first_seen_ranks(draws)
        rank_counts += np.bincount(ranks.ravel(), minlength=c)[:c]
        distinct[lo : lo + k] = ranks.max(axis=1) + 1
    admitted = np.cumsum(rank_counts) / rank_counts.sum()
    rows = []
    for L in range(1, cap + 1):
        delayed = 0.0 if cap <= L else max(0.0, float(1.0 - admitted[L - 1]))
        rows.append(SlotRow(L, delayed, float(np.mean(distinct > L))))
    return rows, distinct


# ---------------------------------------------------------------------------------------------------
# Host tier: LRU under the independent reference model, Che's approximation.


def che_hit_ratio(p: np.ndarray, m: int) -> float:
    """LRU hit ratio of a cache of m items under IRM with popularity p (Che's approximation).

    m >= the number of adapters with p > 0: 1.0. Uniform p gives the exact m / N.
    """
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    if m <= 0:
        return 0.0
    if m >= len(p):
        return 1.0
    if np.allclose(p, p[0]):  # uniform: T = -N ln(1 - m/N), hit = 1 - exp(-T/N) = m/N
        return m / len(p)
    t = che_time(p, m)
    return float(np.dot(p, -np.expm1(-p * t)))


def che_time(p: np.ndarray, m: int) -> float:
    """The characteristic time T with sum_i (1 - exp(-p_i T)) = m (0 < m < #{p_i > 0}), by bisection on log T."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    if not 0 < m < len(p):
        raise ValueError(f"Che's characteristic time needs 0 < m < {len(p)}, got m={m}")

    def filled(t: float) -> float:
        return float(-np.expm1(-p * t).sum())

    lo, hi = 1e-12, 1.0
    while filled(hi) < m:
        hi *= 2.0
    lo = hi / 2.0 if hi > 1.0 else lo
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if filled(mid) < m:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return math.sqrt(lo * hi)


def lru_hit_ratio_simulated(p: np.ndarray, m: int, draws: int, seed: int = 0) -> float:
    """Direct LRU simulation (for checking Che's approximation): hit share of `draws` IRM requests, cache warmed first."""
    from collections import OrderedDict

    rng = np.random.default_rng(seed)
    stream = rng.choice(len(p), size=2 * draws, p=p)
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for i, a in enumerate(stream.tolist()):
        if a in cache:
            cache.move_to_end(a)
            hits += i >= draws
        else:
            cache[a] = None
            if len(cache) > m:
                cache.popitem(last=False)
    return hits / draws


def _smallest_cache(p: np.ndarray, lo: int, target: float) -> int:
    """Smallest m >= lo with che_hit_ratio(p, m) >= target (the hit ratio grows with m)."""
    hi = int((p > 0).sum())
    if lo >= hi or che_hit_ratio(p, lo) >= target:
        return max(lo, 1)
    while hi - lo > 1:  # invariant: hit(lo) < target <= hit(hi)
        mid = (lo + hi) // 2
        if che_hit_ratio(p, mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------------
# The recommendation.


def _law_name(traffic: str) -> str:
    spec = parse_traffic(traffic).spec
    name, _, rest = spec.partition(":")
    return {
        "zipf": f"Zipf {rest}",
        "power": f"power-law a={rest}",
        "hotset": f"hot-set {rest}",
        "uniform": "uniform traffic",
        "drift": f"drifting {rest}",
    }.get(name, spec)


def _pct(x: float) -> str:
    return "0%" if x == 0 else f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%"


def recommend(
    num_adapters: int,
    traffic: str,
    concurrency: int,
    slo_ttft_ms: float | None = None,
    policy: str = "vllm",
    adapter_bytes: int | None = None,
    host_memory_gb: float | None = None,
    samples: int = 20_000,
    seed: int = 0,
) -> Recommendation:
    """max_loras and max_cpu_loras for N adapters under `traffic` at `concurrency` requests in flight."""
    if num_adapters < 1:
        raise ValueError(f"the number of adapters must be >= 1, got {num_adapters}")
    if concurrency < 1:
        raise ValueError(f"concurrency (requests in flight) must be >= 1, got {concurrency}")
    if slo_ttft_ms is not None and not slo_ttft_ms > 0:
        raise ValueError(f"the TTFT SLO must be > 0 ms, got {slo_ttft_ms}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if samples < 100:
        raise ValueError(f"samples must be >= 100, got {samples}")
    if (adapter_bytes is None) != (host_memory_gb is None):
        raise ValueError("give both the adapter size and the host memory budget, or neither")
    if adapter_bytes is not None and not adapter_bytes > 0:
        raise ValueError(f"the adapter size must be > 0 bytes, got {adapter_bytes}")
    if host_memory_gb is not None and not host_memory_gb > 0:
        raise ValueError(f"the host memory budget must be > 0 GB, got {host_memory_gb}")
    p = parse_traffic(traffic).probabilities(num_adapters)  # raises ValueError naming a bad law

    n, c = num_adapters, concurrency
    cap = min(n, c)
    table, distinct = slot_table(p, c, samples, seed)
    p90 = int(np.quantile(distinct, Q_NO_SLO, method="inverted_cdf"))
    p99 = int(np.quantile(distinct, Q_SLO, method="inverted_cdf"))
    mean_distinct = expected_distinct(p, c)  # sum_k 1 - (1 - p_k)^c, exact
    by_requests = next((r.max_loras for r in table if r.delayed_fraction <= 1 - Q_SLO), cap)
    L = min(p90, cap)
    if slo_ttft_ms is not None:
        L = max(L, by_requests)
    delayed = table[L - 1].delayed_fraction

    # Host tier.
    host_fit = None
    notes = []
    m = _smallest_cache(p, L, HOST_HIT_TARGET)
    if adapter_bytes is not None and host_memory_gb is not None:
        host_fit = int(host_memory_gb * 1e9 // adapter_bytes)
        if host_fit >= n:
            m = n
            notes.append(
                f"all {n} adapters fit in {host_memory_gb:g} GB of host memory, so max_cpu_loras {n} keeps "
                "every adapter on the host and no request reads one from disk"
            )
        elif host_fit < m:
            notes.append(
                f"the {m} host slots needed for a {_pct(HOST_HIT_TARGET)} hit ratio do not fit in "
                f"{host_memory_gb:g} GB ({host_fit} adapters do), so max_cpu_loras is {max(host_fit, L)}"
            )
            m = max(host_fit, L)
            if host_fit < L:
                notes.append(f"even the {L} device slots' adapters do not fit in the host budget")
    hit = che_hit_ratio(p, m)

    # The paragraph.
    lower = max(1, L // 2)
    text = (
        f"With {_law_name(traffic)} over {n} adapters and {c} requests in flight, a step holds "
        f"{mean_distinct:.1f} distinct adapters on average and {p90} or fewer 90% of the time "
        f"({p99} or fewer 99% of the time). "
    )
    if slo_ttft_ms is None:
        text += f"Following the p90 rule, max_loras {L} "
    else:
        text += (
            f"For a p99 TTFT SLO of {slo_ttft_ms:g} ms at most 1% of requests may wait for a slot (a waiting "
            f"request waits about a whole request lifetime), which takes max_loras {by_requests} "
            f"({_pct(table[by_requests - 1].delayed_fraction)} wait), and the p90 rule asks for {min(p90, cap)}; "
            f"max_loras {L} "
        )
    text += f"leaves {_pct(delayed)} of requests waiting for a slot"
    if lower < L:
        text += f", {lower} would leave {_pct(table[lower - 1].delayed_fraction)}"
    text += (
        f"; beyond {cap} (min of adapters and concurrency) more slots can never be used. "
        f"A host LRU tier of max_cpu_loras {m} serves {_pct(hit) if hit < 0.9995 else '100%'} of requests "
        "from host memory (Che's approximation)"
    )
    text += "; " + "; ".join(notes) + "." if notes else "."
    if policy == "fair":
        text += (
            " Under the fair policy a waiting request's wait is bounded by its age, so a lower max_loras trades "
            "throughput rather than starving rare adapters; the numbers above are the same model."
        )
    return Recommendation(
        n,
        parse_traffic(traffic).spec,
        c,
        policy,
        slo_ttft_ms,
        L,
        m,
        mean_distinct,
        p90,
        p99,
        delayed,
        hit,
        table,
        host_fit,
        text,
    )


def candidates(rec: Recommendation, n_max: int | None = None) -> list[int]:
    """max_loras settings to measure around the recommendation: L/2, L, 2L (rounded, >= 1, <= 2 n_max).

    n_max defaults to min(N, c), the most slots a step can use.
    """
    n_max = min(rec.num_adapters, rec.concurrency) if n_max is None else n_max
    L = rec.max_loras
    values = {math.floor(L / 2 + 0.5), L, 2 * L}
    return sorted({min(max(1, v), 2 * n_max) for v in values})


def _measured(rows: list[dict]) -> dict[int, list[tuple[float, float]]]:
    """max_loras -> [(tok/s, p99 TTFT ms), ...], one pair per repetition."""
    got: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        for key in ("max_loras", "output_tok_s", "ttft_ms_p99"):
            if key not in r:
                raise ValueError(f"a measured row lacks {key!r}")
        tok_s = float(r["output_tok_s"])
        if not tok_s > 0:
            raise ValueError(f"a measured row has output_tok_s {r['output_tok_s']!r}; need > 0")
        got[int(r["max_loras"])].append((tok_s, float(r["ttft_ms_p99"])))
    return got


def _per_setting(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """max_loras -> (median tok/s, median p99 TTFT ms) over repetitions."""
    return {
        k: (float(np.median([a for a, _ in v])), float(np.median([b for _, b in v])))
        for k, v in _measured(rows).items()
    }


def throughput_noise(rows: list[dict]) -> float:
    """Pooled standard deviation of log(tok/s) between repetitions of a setting (0 without repetitions).

    s^2 = sum over settings and repetitions of (log t - mean of its setting)^2 / sum over settings of (R - 1).
    """
    ss, dof = 0.0, 0
    for v in _measured(rows).values():
        logs = np.log([a for a, _ in v])
        ss += float(((logs - logs.mean()) ** 2).sum())
        dof += len(logs) - 1
    return math.sqrt(ss / dof) if dof else 0.0


def best_region(rows: list[dict], slo_ttft_ms: float | None = None, tolerance: float = 0.10) -> list[int]:
    """The measured max_loras values that are near-best on both axes.

    Repetitions of a setting are reduced to their medians. Throughput: within `tolerance` of the
    best setting's, or not resolvably further: log(best / t_k) <= -log(1 - tolerance) + 2 s sqrt(1/R_k +
    1/R_best), s = `throughput_noise` (two standard errors of the difference; 0 with one run each,
    so then it is the plain tolerance). Tail: p99 TTFT meets the SLO; with no SLO, or when no setting
    meets it, p99 TTFT within 2x of the smallest measured. May be empty.
    """
    if not rows:
        raise ValueError("no measured rows")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    runs = _measured(rows)
    per = _per_setting(rows)
    noise = throughput_noise(rows)
    top = max(per, key=lambda k: per[k][0])

    def near_best(k: int) -> bool:
        margin = 2 * noise * math.sqrt(1 / len(runs[k]) + 1 / len(runs[top]))
        return math.log(per[top][0] / per[k][0]) <= -math.log1p(-tolerance) + margin + 1e-12

    fast = {k for k in per if near_best(k)}
    met = {k for k, (_, p) in per.items() if slo_ttft_ms is not None and p <= slo_ttft_ms}
    if not met:
        floor = min(p for _, p in per.values())
        met = {k for k, (_, p) in per.items() if p <= 2 * floor}
    return sorted(fast & met)


def confirm(rec: Recommendation, rows: list[dict], slo_ttft_ms: float | None = None) -> tuple[str, bool]:
    """Is the recommended max_loras inside the measured best region? A short verdict and the answer.

    When the recommendation itself was measured, inside = it is in the region. Otherwise it is judged
    between the region's smallest and largest measured settings (on a U-curve the region is an
    interval of the knob); the verdict says so. `candidates` always includes it, so measure it.
    """
    region = best_region(rows, slo_ttft_ms)
    per = _per_setting(rows)
    if not region:
        return "no measured setting is near-best on both throughput and p99 TTFT; measure more settings", False
    ml, lo, hi = rec.max_loras, region[0], region[-1]
    measured = ml in per
    inside = ml in region if measured else lo <= ml <= hi
    span = ", ".join(map(str, region))
    how = "" if measured else " (not measured itself: judged between the measured settings)"
    if inside:
        return f"confirmed: max_loras {ml} lies in the measured best region {{{span}}}{how}", True
    best = max(per, key=lambda k: per[k][0])
    side = "below" if ml < lo else "above" if ml > hi else "inside the span of, but not in,"
    return (
        f"not confirmed: max_loras {ml} lies {side} the measured best region {{{span}}}{how} "
        f"(best throughput at {best}: {per[best][0]:.0f} tok/s, p99 TTFT {per[best][1]:.0f} ms)"
    ), False
