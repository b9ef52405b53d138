"""Seeded, reproducible workloads: which adapter each request asks for, when it is sent, how long it is.

One seed gives the same workload on any machine with the same numpy (numpy's ``Generator`` streams
are platform independent; its distribution algorithms may change between numpy versions). Each part
of a workload draws from its own stream (``default_rng([seed, 0, stream])``), so changing the arrival
process never changes the adapters or lengths: cells that differ in one knob get the same requests.

Adapter indices run 0..N-1; -1 is the base model (``base_share``). The CLI spellings of
``--traffic``, ``--arrival`` and ``--input-len``/``--output-len`` are parsed here, with errors that
name the bad part and list the accepted forms.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TRAFFIC_FORMS = "uniform | zipf:S | power:A | hotset:F:P | drift:LAW:PERIOD (e.g. zipf:1.5, power:0.5, hotset:0.05:0.9, drift:zipf:1.5:200)"
ARRIVAL_FORMS = "poisson | gamma:CV | constant (e.g. gamma:2)"
LENGTH_FORMS = "L | fixed:L | uniform:LO:HI | normal:MEAN:STD | lognormal:MEAN:SIGMA (e.g. 128, uniform:8:512)"
TRACE_COLUMNS = ("time_s", "adapter", "input_len", "output_len")

# One stream per part of a workload (see the module docstring).
_ADAPTER, _BASE, _ARRIVAL, _INPUT, _OUTPUT = 1, 2, 3, 4, 5


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


# ---------------------------------------------------------------------------------------------------
# Workloads.


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    index: int
    adapter: int  # -1 = base model
    intended_send_s: float | None  # None = closed loop (sent when a client slot frees)
    input_len: int
    output_len: int
    prompt_token_ids: list[int]


@dataclass(frozen=True, eq=False)
class Workload:
    """Per-request arrays; prompts are made lazily from (prompt_seed, index) so 100k requests stay small."""

    adapter: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray
    send_time_s: np.ndarray | None
    n_adapters: int
    prompt_seed: int
    vocab_size: int
    token_low: int = 0
    meta: dict[str, object] = field(default_factory=dict)  # specs, seed, rate: for the manifest

    def __len__(self) -> int:
        return len(self.adapter)

    def prompt_token_ids(self, i: int) -> list[int]:
        """Request i's prompt: input_len[i] ids uniform in [token_low, vocab_size), the same on every engine."""
        rng = np.random.default_rng([self.prompt_seed, 1, i])
        return rng.integers(self.token_low, self.vocab_size, int(self.input_len[i])).tolist()

    def request(self, i: int) -> WorkloadRequest:
        send = None if self.send_time_s is None else float(self.send_time_s[i])
        return WorkloadRequest(i, int(self.adapter[i]), send, int(self.input_len[i]), int(self.output_len[i]), self.prompt_token_ids(i))

    def __iter__(self) -> Iterator[WorkloadRequest]:
        return (self.request(i) for i in range(len(self)))

    def same_as(self, other: Workload) -> bool:
        """Identical requests (adapters, lengths, send times, prompts)."""
        arrays = ("adapter", "input_len", "output_len")
        if any(not np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays):
            return False
        if (self.send_time_s is None) != (other.send_time_s is None):
            return False
        if self.send_time_s is not None and not np.array_equal(self.send_time_s, other.send_time_s):
            return False
        return (self.prompt_seed, self.vocab_size, self.token_low) == (other.prompt_seed, other.vocab_size, other.token_low)


def _stream(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0, stream])


def build_workload(
    n_adapters: int,
    traffic: str | PopularityLaw,
    count: int,
    input_lens: str | int | LengthDist,
    output_lens: str | int | LengthDist,
    seed: int,
    rate: float | None = None,
    arrival: str | ArrivalProcess | None = None,
    base_share: float = 0.0,
    vocab_size: int = 32000,
    token_low: int = 0,
    prompt_seed: int | None = None,
) -> Workload:
    """A seeded workload. rate None = closed loop (no send times); a rate without arrival is Poisson.

    base_share: each request independently goes to the base model (adapter -1) with this probability;
    n_adapters may be 0 only when base_share is 1.
    """
    if seed < 0 or (prompt_seed is not None and prompt_seed < 0):
        raise ValueError(f"seeds must be >= 0, got seed={seed}, prompt_seed={prompt_seed}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0 <= base_share <= 1:
        raise ValueError(f"base_share must be in [0, 1], got {base_share}")
    if n_adapters < (0 if base_share == 1 else 1):
        raise ValueError(f"n_adapters must be >= 1 (or 0 with base_share=1), got {n_adapters}")
    if not 0 <= token_low < vocab_size:
        raise ValueError(f"need 0 <= token_low < vocab_size, got token_low={token_low}, vocab_size={vocab_size}")
    if arrival is not None and rate is None:
        raise ValueError("an arrival process needs a rate (requests/s); without one the run is closed loop")
    law = parse_traffic(traffic) if isinstance(traffic, str) else traffic
    proc = arrival if isinstance(arrival, ArrivalProcess) else parse_arrival(arrival or "poisson")
    ins = input_lens if isinstance(input_lens, LengthDist) else parse_lengths(input_lens)
    outs = output_lens if isinstance(output_lens, LengthDist) else parse_lengths(output_lens)

    if n_adapters >= 1:
        adapter = law.sample(n_adapters, count, _stream(seed, _ADAPTER))
    else:
        adapter = np.zeros(count, dtype=np.int64)
    if base_share > 0:
        adapter[_stream(seed, _BASE).random(count) < base_share] = -1
    send = None if rate is None else proc.intended_send_times(rate, count, _stream(seed, _ARRIVAL))
    meta: dict[str, object] = {"traffic": law.spec, "arrival": None if rate is None else proc.spec, "rate": rate,
                               "input_len": ins.spec, "output_len": outs.spec, "base_share": base_share, "seed": seed}
    return Workload(adapter, ins.sample(count, _stream(seed, _INPUT)), outs.sample(count, _stream(seed, _OUTPUT)), send,
                    n_adapters, seed if prompt_seed is None else prompt_seed, vocab_size, token_low, meta)


# ---------------------------------------------------------------------------------------------------
# Traces: CSV (header row) or JSONL (one object a line) with time_s, adapter, input_len, output_len.


def _trace_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with path.open(newline="") as fh:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(fh)
            missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: line 1: header lacks column {missing[0]!r} (need {', '.join(TRACE_COLUMNS)})")
            for row in reader:
                yield reader.line_num, dict(row)
            return
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}: line {lineno}: expected a JSON object")
                yield lineno, obj


def load_trace(path: str | Path, vocab_size: int = 32000, token_low: int = 0, prompt_seed: int = 0) -> Workload:
    """A recorded trace (.csv, else JSONL) as a workload; adapter -1 = base model; prompts seeded as in build_workload.

    Rows are requests in file order; time_s (seconds from the start) must not decrease.
    """
    path = Path(path)
    cols: dict[str, list[float]] = {c: [] for c in TRACE_COLUMNS}
    for lineno, row in _trace_rows(path):
        for c in TRACE_COLUMNS:
            if row.get(c) in (None, ""):
                raise ValueError(f"{path}: line {lineno}: missing column {c!r} (need {', '.join(TRACE_COLUMNS)})")
            try:
                v = float(row[c])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {lineno}: column {c!r} = {row[c]!r} is not a number") from None
            whole = math.isfinite(v) and v == int(v)
            ok = {"time_s": math.isfinite(v) and v >= 0, "adapter": whole and v >= -1}.get(c, whole and v >= 1)
            if not ok:
                need = {"time_s": "a finite time >= 0", "adapter": "an integer >= -1"}.get(c, "an integer >= 1")
                raise ValueError(f"{path}: line {lineno}: column {c!r} = {row[c]!r} must be {need}")
            if c == "time_s" and cols[c] and v < cols[c][-1]:
                raise ValueError(f"{path}: line {lineno}: time_s {v} is before the previous row's {cols[c][-1]}")
            cols[c].append(v)
    adapter = np.array(cols["adapter"], dtype=np.int64)
    return Workload(adapter, np.array(cols["input_len"], dtype=np.int64), np.array(cols["output_len"], dtype=np.int64),
                    np.array(cols["time_s"], dtype=np.float64), int(adapter.max(initial=-1)) + 1, prompt_seed, vocab_size,
                    token_low, {"trace": str(path)})


def save_trace(workload: Workload, path: str | Path) -> None:
    """Write an open-loop workload as CSV (.csv) or JSONL (anything else); load_trace reads it back."""
    if workload.send_time_s is None:
        raise ValueError("a closed-loop workload has no send times to write; build it with a rate")
    path = Path(path)
    rows = zip(workload.send_time_s.tolist(), workload.adapter.tolist(), workload.input_len.tolist(), workload.output_len.tolist())
    with path.open("w", newline="") as fh:
        if path.suffix.lower() == ".csv":
            writer = csv.writer(fh)
            writer.writerow(TRACE_COLUMNS)
            writer.writerows((repr(t), a, i, o) for t, a, i, o in rows)
        else:
            fh.writelines(json.dumps(dict(zip(TRACE_COLUMNS, r))) + "\n" for r in rows)
