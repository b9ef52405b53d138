"""Experiment specs: a grid of cells in TOML, validated once, expanded in a fixed order; and the presets.

A spec has run-wide settings (model, lengths, requests, warm-up, repetitions, SLOs, how to start the
engine) and one or more `[[sweep]]` tables. Each sweep is a grid: every list-valued axis is crossed
with the others. Axes: adapters (N), concurrency (closed loop) or rate (open loop), traffic (law),
max_loras, max_cpu_loras, rank, policy, engine. A scalar counts as a one-element list.

    name = "mine"
    model = "tiny"
    input_len = "128"
    output_len = "64"
    requests = 128
    warmup = 16
    repetitions = 1

    [headline]            # these cells get more repetitions (for confidence intervals)
    repetitions = 3
    cells = [{ adapters = 1000, concurrency = 32, traffic = "uniform" }]

    [[sweep]]
    name = "max_loras"
    adapters = [10, 100]
    concurrency = 32
    traffic = "zipf:1.5"
    max_loras = [4, 8, 16, 32]
    policy = ["vllm", "fair"]

Presets (`quick`, `seed`, `fair-vs-vllm`) are TOML files shipped in `lorascope/presets/`; print one
with `lorascope run --preset NAME --show-spec` and start your own from it.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from lorascope.loadgen.workload import parse_traffic

ENGINES = ("embedded", "vllm", "sglang", "url")
POLICIES = ("fair", "vllm")
WARMUP_MODES = ("all", "workload", "auto")
PRESETS = ("quick", "seed", "fair-vs-vllm")
AXES = ("adapters", "concurrency", "rate", "traffic", "max_loras", "max_cpu_loras", "rank", "policy", "engine")


class SpecError(ValueError):
    """A spec that cannot run; the message names the key and the fix."""


@dataclass(frozen=True, slots=True)
class Cell:
    """One point of the grid: a fresh server with these knobs, driven with this workload."""

    sweep: str
    engine: str
    adapters: int
    concurrency: int | None
    rate: float | None
    traffic: str
    max_loras: int
    max_cpu_loras: int | None  # None: the engine's default (vLLM: max_loras)
    rank: int
    policy: str  # the embedded engine's scheduler; other engines: their own (recorded as the engine's name)
    repetitions: int

    @property
    def cell_id(self) -> str:
        load = f"c{self.concurrency}" if self.concurrency is not None else f"r{self.rate:g}"
        cpu = f"-cpu{self.max_cpu_loras}" if self.max_cpu_loras is not None else ""
        raw = (f"{self.sweep}-{self.engine}-n{self.adapters}-{load}-{self.traffic}-ml{self.max_loras}{cpu}"
               f"-rank{self.rank}-{self.policy}")
        return re.sub(r"[^A-Za-z0-9_.+-]", "", raw.replace(":", "").replace("/", "_"))

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "repetitions"}


@dataclass(slots=True)
class Sweep:
    name: str
    adapters: list[int]
    traffic: list[str]
    max_loras: list[int]
    concurrency: list[int] | None = None
    rate: list[float] | None = None
    max_cpu_loras: list[int | None] = field(default_factory=lambda: [None])
    rank: list[int] | None = None  # None: the spec's rank
    policy: list[str] | None = None  # None: ["fair"]
    engine: list[str] | None = None  # None: the spec's engine
    repetitions: int | None = None  # None: the spec's


@dataclass(slots=True)
class ExperimentSpec:
    name: str
    sweeps: list[Sweep]
    description: str = ""
    engine: str = "embedded"
    model: str = "auto"  # a preset, a Hugging Face directory, or auto: llama-3.1-8b on a GPU, tiny without
    device: str = "auto"  # cpu | cuda | auto
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto: bfloat16 on a GPU, float32 without
    rank: int = 16
    targets: str = "q_proj,v_proj"
    input_len: str = "128"
    output_len: str = "128"
    requests: int = 1000
    warmup: int = 50
    warmup_mode: str = "auto"
    repetitions: int = 1
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    max_num_seqs: int = 256
    max_model_len: int = 2048
    max_lora_rank: int | None = None  # None: the largest rank of the grid
    arrival: str = "poisson"
    headline_repetitions: int | None = None
    headline_cells: list[dict[str, Any]] = field(default_factory=list)
    vllm_cmd: str = "vllm serve"
    sglang_cmd: str = "python -m sglang.launch_server"
    url: str | None = None
    extra_server_args: list[str] = field(default_factory=list)

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "spec") -> ExperimentSpec:
        data = dict(data)
        raw_sweeps = data.pop("sweep", data.pop("sweeps", None))
        if not raw_sweeps or not isinstance(raw_sweeps, list):
            raise SpecError(f"{origin}: no [[sweep]] tables; add at least one, e.g. [[sweep]] name = \"A\" adapters = [1, 100] ...")
        headline = data.pop("headline", None) or {}
        if headline:
            _known(headline, {"repetitions", "cells"}, f"{origin} [headline]")
            data["headline_repetitions"] = headline.get("repetitions")
            data["headline_cells"] = list(headline.get("cells", []))
        allowed = {f.name for f in fields(cls)} - {"sweeps"}
        _known(data, allowed, origin)
        if "name" not in data:
            raise SpecError(f"{origin}: needs a name (name = \"...\")")
        sweeps = [_sweep(s, i, origin) for i, s in enumerate(raw_sweeps)]
        for key in ("input_len", "output_len"):
            if key in data:
                data[key] = str(data[key])
        spec = cls(sweeps=sweeps, **data)
        spec.validate(origin)
        return spec

    @classmethod
    def from_toml(cls, path: Path) -> ExperimentSpec:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"spec file {path} does not exist; give a TOML file or --preset {'|'.join(PRESETS)}") from None
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (the manifest stores it; `from_dict` reads it back for --resume)."""
        d = asdict(self)
        d["sweep"] = [{k: v for k, v in s.items() if v is not None} for s in d.pop("sweeps")]
        if d.pop("headline_repetitions") is not None or d["headline_cells"]:
            d["headline"] = {"repetitions": self.headline_repetitions, "cells": d["headline_cells"]}
        d.pop("headline_cells")
        return {k: v for k, v in d.items() if v is not None}

    # --- checks -----------------------------------------------------------------------------------

    def validate(self, origin: str = "spec") -> None:
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{origin}: {name} must be a positive integer, got {value!r}")

        for name in ("rank", "requests", "repetitions", "max_num_seqs", "max_model_len"):
            positive_int(name, getattr(self, name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise SpecError(f"{origin}: warmup must be an integer >= 0, got {self.warmup!r}")
        if self.engine not in ENGINES:
            raise SpecError(f"{origin}: engine must be one of {ENGINES}, got {self.engine!r}")
        if self.warmup_mode not in WARMUP_MODES:
            raise SpecError(f"{origin}: warmup_mode must be one of {WARMUP_MODES}, got {self.warmup_mode!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SpecError(f"{origin}: device must be auto, cpu or cuda, got {self.device!r}")
        if self.headline_repetitions is not None:
            positive_int("[headline] repetitions", self.headline_repetitions)
        for i, h in enumerate(self.headline_cells):
            if not isinstance(h, dict) or not h:
                raise SpecError(f"{origin}: [headline] cells[{i}] must be a table like {{ adapters = 1000 }}")
            _known(h, set(AXES) | {"sweep"}, f"{origin} [headline] cells[{i}]")
        if self.max_lora_rank is not None:
            positive_int("max_lora_rank", self.max_lora_rank)
        names = [s.name for s in self.sweeps]
        if len(set(names)) != len(names):
            raise SpecError(f"{origin}: sweep names repeat ({names}); give each [[sweep]] its own name")
        cells = self.cells()
        if self.max_lora_rank is not None and any(c.rank > self.max_lora_rank for c in cells):
            raise SpecError(f"{origin}: a sweep has rank > max_lora_rank {self.max_lora_rank}; raise max_lora_rank")
        if any(c.engine == "url" for c in cells) and not self.url:
            raise SpecError(f"{origin}: engine url needs url = \"http://HOST:PORT\"")

    # --- expansion --------------------------------------------------------------------------------

    def cells(self) -> list[Cell]:
        """Every cell, sweep by sweep, in grid order; a cell repeated inside one sweep appears once."""
        out: list[Cell] = []
        for sweep in self.sweeps:
            seen: set[str] = set()
            loads: list[tuple[int | None, float | None]] = (
                [(c, None) for c in sweep.concurrency] if sweep.concurrency else [(None, r) for r in sweep.rate or []]
            )
            for engine, n, (c, r), traffic, ml, cpu, rank, policy in itertools.product(
                sweep.engine or [self.engine], sweep.adapters, loads, sweep.traffic, sweep.max_loras,
                sweep.max_cpu_loras, sweep.rank or [self.rank], sweep.policy or ["fair"],
            ):
                policy = policy if engine == "embedded" else engine
                reps = sweep.repetitions or self.repetitions
                cell = Cell(sweep.name, engine, n, c, r, traffic, ml, cpu, rank, policy, reps)
                if self._is_headline(cell) and self.headline_repetitions:
                    cell = Cell(**{**cell.params(), "repetitions": max(reps, self.headline_repetitions)})
                if cell.cell_id not in seen:
                    seen.add(cell.cell_id)
                    out.append(cell)
        return out

    def _is_headline(self, cell: Cell) -> bool:
        params = cell.params()
        return any(all(params.get(k) == v for k, v in h.items()) for h in self.headline_cells)

    def runs(self) -> list[tuple[Cell, int]]:
        """(cell, repetition) in the order they run: every cell's first repetition before any second."""
        cells = self.cells()
        most = max(c.repetitions for c in cells)
        return [(c, rep) for rep in range(most) for c in cells if rep < c.repetitions]

    def with_overrides(self, engine: str | None = None, model: str | None = None, device: str | None = None,
                       vllm_cmd: str | None = None, url: str | None = None, sets: list[str] | None = None) -> ExperimentSpec:
        """The spec with command-line overrides. `engine` replaces every sweep's engine axis; for an
        engine other than the embedded one the policy axis goes (it runs its own scheduler) and a
        sweep that only measures the fair policy is dropped."""
        data = self.to_dict()
        if engine is not None:
            data["engine"] = engine
            for s in data["sweep"]:
                s.pop("engine", None)
            if engine != "embedded":  # the policy axis is the embedded engine's: others have their own scheduler
                kept = [s for s in data["sweep"] if set(s.get("policy", ["fair"])) != {"fair"}]
                if not kept:
                    raise SpecError(f"spec {self.name!r} only measures the embedded engine's fair policy; "
                                    f"{engine} has its own scheduler: run it with --engine embedded")
                for s in kept:
                    s.pop("policy", None)
                data["sweep"] = kept
        for key, value in (("model", model), ("device", device), ("vllm_cmd", vllm_cmd), ("url", url)):
            if value is not None:
                data[key] = value
        for item in sets or []:
            key, value = parse_set(item)
            data[key] = value
        return ExperimentSpec.from_dict(data, f"spec {self.name!r} with overrides")


def parse_set(item: str) -> tuple[str, Any]:
    """`--set KEY=VALUE` for a run-wide key (e.g. requests=64, output_len=32, slo_ttft_ms=500);
    VALUE is read as TOML (numbers, true/false, quoted strings, lists), else taken as a string."""
    key, sep, value = item.partition("=")
    key = key.strip()
    allowed = {f.name for f in fields(ExperimentSpec)} - {"sweeps", "headline_cells", "headline_repetitions", "name"}
    if not sep or key not in allowed:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(allowed))} "
                        "(the grid itself is changed in a spec file: --show-spec prints one to copy)")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def _known(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(sorted(allowed))}")


def _listify(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _sweep(raw: Any, index: int, origin: str) -> Sweep:
    where = f"{origin} [[sweep]] #{index + 1}"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a table")
    _known(raw, {f.name for f in fields(Sweep)}, where)
    name = raw.get("name") or f"sweep{index + 1}"
    where = f"{origin} [[sweep]] {name!r}"
    for key in ("adapters", "traffic", "max_loras"):
        if key not in raw:
            raise SpecError(f"{where}: needs {key} (a value or a list)")
    if ("concurrency" in raw) == ("rate" in raw):
        raise SpecError(f"{where}: give exactly one of concurrency (closed loop) and rate (open loop, requests/s)")
    d: dict[str, Any] = {"name": str(name)}
    for key in ("adapters", "traffic", "max_loras", "concurrency", "rate", "max_cpu_loras", "rank", "policy", "engine"):
        if key in raw:
            d[key] = _listify(raw[key])
            if not d[key]:
                raise SpecError(f"{where}: {key} is an empty list")
    for key in ("adapters", "max_loras", "concurrency", "rank"):
        for v in d.get(key, []):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{where}: {key} values must be positive integers, got {v!r}")
    for v in d.get("rate", []):
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise SpecError(f"{where}: rate values must be positive numbers (requests/s), got {v!r}")
    if "max_cpu_loras" in d:
        d["max_cpu_loras"] = [None if v in (0, "default") else v for v in d["max_cpu_loras"]]
        for v in d["max_cpu_loras"]:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise SpecError(f"{where}: max_cpu_loras values must be positive integers or \"default\", got {v!r}")
        too_small = [(c, m) for c in d["max_cpu_loras"] for m in d["max_loras"] if c is not None and c < m]
        if too_small:
            raise SpecError(f"{where}: max_cpu_loras {too_small[0][0]} < max_loras {too_small[0][1]}; every adapter on "
                            "the device is also held on the host, so max_cpu_loras must be >= max_loras")
    for law in d["traffic"]:
        try:
            parse_traffic(str(law))
        except ValueError as e:
            raise SpecError(f"{where}: traffic {law!r}: {e}") from None
    for p in d.get("policy", []):
        if p not in POLICIES:
            raise SpecError(f"{where}: policy must be one of {POLICIES}, got {p!r}")
    for e in d.get("engine", []):
        if e not in ENGINES:
            raise SpecError(f"{where}: engine must be one of {ENGINES}, got {e!r}")
    if "repetitions" in raw:
        r = raw["repetitions"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise SpecError(f"{where}: repetitions must be a positive integer, got {r!r}")
        d["repetitions"] = r
    return Sweep(**d)


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or give --spec FILE.toml")
    return Path(str(resources.files("lorascope") / "presets" / f"{name}.toml"))


def load_preset(name: str) -> ExperimentSpec:
    return ExperimentSpec.from_toml(preset_path(name))
