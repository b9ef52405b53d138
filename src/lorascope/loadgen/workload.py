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

from lorascope.loadgen.laws import (
    ARRIVAL_FORMS,
    LENGTH_FORMS,
    TRAFFIC_FORMS,
    ArrivalProcess,
    Drift,
    HotSet,
    LengthDist,
    PopularityLaw,
    Power,
    Uniform,
    Zipf,
    parse_arrival,
    parse_lengths,
    parse_traffic,
)

__all__ = [
    "ARRIVAL_FORMS",
    "LENGTH_FORMS",
    "TRACE_COLUMNS",
    "TRAFFIC_FORMS",
    "ArrivalProcess",
    "Drift",
    "HotSet",
    "LengthDist",
    "PopularityLaw",
    "Power",
    "Uniform",
    "Workload",
    "WorkloadRequest",
    "Zipf",
    "build_workload",
    "load_trace",
    "parse_arrival",
    "parse_lengths",
    "parse_traffic",
    "save_trace",
]

TRACE_COLUMNS = ("time_s", "adapter", "input_len", "output_len")

# One stream per part of a workload (see the module docstring).
_ADAPTER, _BASE, _ARRIVAL, _INPUT, _OUTPUT = 1, 2, 3, 4, 5

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
