"""The laws a workload is drawn from: adapter popularity, arrival processes, length distributions,
and the parsers for their CLI spellings (errors name the bad part and list the accepted forms).

Adapter indices run 0..N-1. Every law gives its exact pmf (`probabilities`) beside `sample`, so the
working set it implies can be predicted (workingset.py) and tested against samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRAFFIC_FORMS = "uniform | zipf:S | power:A | hotset:F:P | drift:LAW:PERIOD (e.g. zipf:1.5, power:0.5, hotset:0.05:0.9, drift:zipf:1.5:200)"
ARRIVAL_FORMS = "poisson | gamma:CV | constant (e.g. gamma:2)"
LENGTH_FORMS = "L | fixed:L | uniform:LO:HI | normal:MEAN:STD | lognormal:MEAN:SIGMA (e.g. 128, uniform:8:512)"



def _ceil_count(fraction: float, n: int) -> int:
    # ceil(F*N) without float noise turning 0.07*100 = 7.000000000000001 into 8.
    return math.ceil(fraction * n - 1e-9)


def _inverse_cdf(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    # Sample indices by inverting the CDF: u in [cdf[k-1], cdf[k]) -> k; zero-probability entries get
    # an empty interval. Only rng.random() is used, the most stable of numpy's streams.
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# Popularity laws: probabilities(n, t) is the exact pmf over adapter indices at request index t.


class PopularityLaw:
    """Base class. Time-invariant laws sample by inverting their pmf."""

    @property
    def spec(self) -> str:
        """The law as --traffic spells it."""
        raise NotImplementedError

    def probabilities(self, n: int, t: int = 0) -> np.ndarray:
        raise NotImplementedError

    def sample(self, n: int, count: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
        """Adapter indices of requests start..start+count-1 (int64)."""
        if n < 1:
            raise ValueError(f"need at least one adapter, got n={n}")
        return _inverse_cdf(self.probabilities(n, start), rng.random(count))


@dataclass(frozen=True)
class Uniform(PopularityLaw):
    """Every adapter equally likely."""

    def probabilities(self, n: int, t: int = 0) -> np.ndarray:
        return np.full(n, 1.0 / n)

    @property
    def spec(self) -> str:
        return "uniform"


@dataclass(frozen=True)
class Zipf(PopularityLaw):
    """True (bounded) Zipf over ranks: p(k) = k^-S / H(N,S), k = 1..N; adapter index k-1, so index 0 is hottest."""

    s: float

    def probabilities(self, n: int, t: int = 0) -> np.ndarray:
        w = np.arange(1, n + 1, dtype=np.float64) ** -self.s
        return w / w.sum()

    @property
    def spec(self) -> str:
        return f"zipf:{self.s:g}"


@dataclass(frozen=True)
class Power(PopularityLaw):
    """S-LoRA's law: index = floor(N * X), X ~ numpy power(A) (density A x^(A-1) on [0,1]), clipped to N-1.

    As S-LoRA's benchmarks/trace.py generate_requests: ``(np.random.power(alpha, n) * num_adapters).astype(int)``.

    Exactly as in S-LoRA, A < 1 makes LOW indices hot (index 0 hottest; smaller A = more skewed),
    A = 1 is uniform, A > 1 makes HIGH indices hot. pmf: p(i) = ((i+1)/N)^A - (i/N)^A.
    """

    a: float

    def probabilities(self, n: int, t: int = 0) -> np.ndarray:
        return np.diff((np.arange(n + 1, dtype=np.float64) / n) ** self.a)

    def sample(self, n: int, count: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
        # numpy's own power sampler, as S-LoRA draws it, so the convention is not re-derived.
        return np.minimum(np.floor(n * rng.power(self.a, count)).astype(np.int64), n - 1)

    @property
    def spec(self) -> str:
        return f"power:{self.a:g}"


@dataclass(frozen=True)
class HotSet(PopularityLaw):
    """The first ceil(F*N) adapters by index get share P, uniformly; the others share 1-P uniformly.

    If the hot set is every adapter (F*N rounds up to N), traffic is uniform over all of them.
    """

    fraction: float
    share: float

    def probabilities(self, n: int, t: int = 0) -> np.ndarray:
        hot = _ceil_count(self.fraction, n)
        if hot >= n:
            return np.full(n, 1.0 / n)
        p = np.full(n, (1.0 - self.share) / (n - hot))
        p[:hot] = self.share / hot
        return p

    @property
    def spec(self) -> str:
        return f"hotset:{self.fraction:g}:{self.share:g}"


@dataclass(frozen=True)
class Drift(PopularityLaw):
    """A law whose hot set moves: epoch e = t // PERIOD relabels the adapters by a permutation perm_e.

    In epoch e, adapter perm_e[k] gets the inner law's probability of adapter k. perm_0 is the identity
    (epoch 0 is the inner law itself); perm_e for e >= 1 is ``default_rng([seed, e]).permutation(N)``,
    fixed by the law's own seed (0 unless built otherwise), not by the workload seed.
    """

    law: PopularityLaw
    period: int
    seed: int = 0

    def permutation(self, n: int, epoch: int) -> np.ndarray:
        if epoch == 0:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def probabilities(self, n: int, t: int = 0) -> np.ndarray:
        p = np.empty(n)
        p[self.permutation(n, t // self.period)] = self.law.probabilities(n)
        return p

    def sample(self, n: int, count: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
        out = self.law.sample(n, count, rng)
        # Requests start..start+count-1 cover consecutive epochs: relabel each slice by its permutation.
        for e in range(start // self.period, (start + count - 1) // self.period + 1):
            lo, hi = max(e * self.period - start, 0), min((e + 1) * self.period - start, count)
            out[lo:hi] = self.permutation(n, e)[out[lo:hi]]
        return out

    @property
    def spec(self) -> str:
        return f"drift:{self.law.spec}:{self.period}"


def _check(ok: bool, spec: str, why: str, forms: str) -> None:
    if not ok:
        label = {TRAFFIC_FORMS: "traffic", ARRIVAL_FORMS: "arrival", LENGTH_FORMS: "length"}[forms]
        raise ValueError(f"bad {label} spec {spec!r}: {why}; accepted: {forms}")


def _number(spec: str, part: str, what: str, forms: str, kind: type = float) -> float:
    try:
        value = kind(part)
    except ValueError:
        _check(False, spec, f"{what} {part!r} is not a{'n integer' if kind is int else ' number'}", forms)
    _check(math.isfinite(value), spec, f"{what} {part!r} must be finite", forms)
    return value


def parse_traffic(spec: str) -> PopularityLaw:
    """``--traffic`` -> a law: uniform | zipf:S | power:A | hotset:F:P | drift:LAW:PERIOD."""
    parts = spec.strip().split(":")
    name, args, f = parts[0].lower(), parts[1:], TRAFFIC_FORMS
    if name == "drift":
        _check(len(args) >= 2, spec, "drift needs a law and a period (drift:LAW:PERIOD)", f)
        period = int(_number(spec, args[-1], "drift period", f, int))
        _check(period >= 1, spec, f"drift period {args[-1]!r} must be >= 1", f)
        inner = parse_traffic(":".join(args[:-1]))
        _check(not isinstance(inner, Drift), spec, "a drift of a drift is not supported", f)
        return Drift(inner, period)
    arity = {"uniform": 0, "zipf": 1, "power": 1, "hotset": 2}
    _check(name in arity, spec, f"unknown law {parts[0]!r}", f)
    _check(len(args) == arity[name], spec, f"{name} takes {arity[name]} parameter(s), got {len(args)}", f)
    if name == "uniform":
        return Uniform()
    if name == "zipf":
        s = _number(spec, args[0], "zipf exponent S", f)
        _check(s >= 0, spec, f"zipf exponent S={args[0]} must be >= 0", f)
        return Zipf(s)
    if name == "power":
        a = _number(spec, args[0], "power exponent A", f)
        _check(a > 0, spec, f"power exponent A={args[0]} must be > 0", f)
        return Power(a)
    frac, share = _number(spec, args[0], "hot fraction F", f), _number(spec, args[1], "hot share P", f)
    _check(0 < frac <= 1, spec, f"hot fraction F={args[0]} must be in (0, 1]", f)
    _check(0 <= share <= 1, spec, f"hot share P={args[1]} must be in [0, 1]", f)
    return HotSet(frac, share)


# ---------------------------------------------------------------------------------------------------
# Arrivals (open loop; closed loop is the client's concurrency and has no send times).


@dataclass(frozen=True)
class ArrivalProcess:
    """Gaps between intended sends, mean 1/rate. kind: poisson (CV 1), gamma (CV given), constant (CV 0)."""

    kind: str
    cv: float = 1.0

    def gaps(self, rate: float, count: int, rng: np.random.Generator) -> np.ndarray:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"arrival rate must be a positive number of requests/s, got {rate!r}")
        if self.kind == "constant":
            return np.full(count, 1.0 / rate)
        if self.kind == "poisson":
            return rng.exponential(1.0 / rate, count)
        # Gamma with shape k = 1/CV^2 and scale CV^2/rate: mean 1/rate, std CV/rate (S-LoRA's choice).
        return rng.gamma(1.0 / self.cv**2, self.cv**2 / rate, count)

    def intended_send_times(self, rate: float, count: int, rng: np.random.Generator) -> np.ndarray:
        """Intended send times in seconds, the first at 0."""
        if count <= 0:
            return np.zeros(0)
        return np.concatenate([[0.0], np.cumsum(self.gaps(rate, count - 1, rng))])

    @property
    def spec(self) -> str:
        return f"gamma:{self.cv:g}" if self.kind == "gamma" else self.kind


def parse_arrival(spec: str) -> ArrivalProcess:
    """``--arrival`` -> poisson | gamma:CV | constant."""
    parts = spec.strip().split(":")
    name, f = parts[0].lower(), ARRIVAL_FORMS
    _check(name in ("poisson", "gamma", "constant"), spec, f"unknown arrival process {parts[0]!r}", f)
    if name != "gamma":
        _check(len(parts) == 1, spec, f"{name} takes no parameter", f)
        return ArrivalProcess(name, 1.0 if name == "poisson" else 0.0)
    _check(len(parts) == 2, spec, "gamma takes one parameter, the coefficient of variation CV", f)
    cv = _number(spec, parts[1], "gamma CV", f)
    _check(cv > 0, spec, f"gamma CV={parts[1]} must be > 0 (use constant for CV 0)", f)
    return ArrivalProcess("gamma", cv)


# ---------------------------------------------------------------------------------------------------
# Lengths (token counts, always >= 1).


@dataclass(frozen=True)
class LengthDist:
    """kind fixed (a=L), uniform (a=LO, b=HI, both inclusive), normal (a=MEAN, b=STD; rounded, clipped
    to >= 1), lognormal (a = MEAN OF THE DISTRIBUTION, b = SIGMA of the underlying normal, so
    mu = ln(MEAN) - SIGMA^2/2; rounded, clipped to >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(count, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, count, dtype=np.int64)
        if self.kind == "normal":
            x = rng.normal(self.a, self.b, count)
        else:
            x = rng.lognormal(math.log(self.a) - self.b**2 / 2, self.b, count)
        return np.maximum(np.rint(x), 1).astype(np.int64)

    @property
    def spec(self) -> str:
        return f"fixed:{self.a:g}" if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


def parse_lengths(spec: str | int) -> LengthDist:
    """``--input-len``/``--output-len`` -> L | fixed:L | uniform:LO:HI | normal:MEAN:STD | lognormal:MEAN:SIGMA."""
    text, f = str(spec).strip(), LENGTH_FORMS
    parts = text.split(":")
    _check(text != "", text, "empty spec", f)
    if len(parts) == 1 and text[0] in "-.0123456789":
        parts = ["fixed", parts[0]]  # a bare number is a fixed length (and must be an integer)
    name = parts[0].lower()
    arity = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}
    _check(name in arity, text, f"unknown length distribution {parts[0]!r}", f)
    _check(len(parts) - 1 == arity[name], text, f"{name} takes {arity[name]} parameter(s), got {len(parts) - 1}", f)
    if name in ("fixed", "uniform"):
        vals = [int(_number(text, p, f"{name} length", f, int)) for p in parts[1:]]
        _check(min(vals) >= 1, text, "lengths must be >= 1", f)
        if name == "uniform":
            _check(vals[0] <= vals[1], text, f"uniform needs LO <= HI, got {vals[0]} > {vals[1]}", f)
        return LengthDist(name, vals[0], vals[-1] if name == "uniform" else 0.0)
    mean, spread = (_number(text, p, w, f) for p, w in zip(parts[1:], ("MEAN", "STD" if name == "normal" else "SIGMA")))
    _check(mean > 0, text, f"MEAN={parts[1]} must be > 0", f)
    _check(spread >= 0, text, f"{'STD' if name == 'normal' else 'SIGMA'}={parts[2]} must be >= 0", f)
    return LengthDist(name, mean, spread)
