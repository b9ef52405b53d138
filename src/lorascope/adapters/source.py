"""Adapter sources: where the disk tier reads an adapter from.

`DirectorySource` reads PEFT directories (validated on every read). `SyntheticSource` generates
synthetic adapters on load instead (bit-identical to what `make_adapters` writes and
`read_peft_adapter` reads back), so 10,000+ adapters can be served without the disk to hold them;
the spec string `synthetic:COUNT[:RANK[:LATENCY_MS[:SEED]]]` names one wherever an adapter directory
is taken. Both take an optional injected per-load latency standing in for remote storage, so the
tiers can be studied with slow loads.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Protocol

import torch

from lorascope.adapters.peft import AdapterError, list_adapter_dirs, read_peft_adapter
from lorascope.adapters.synthetic import adapter_names, check_synthetic, synthetic_adapter
from lorascope.model.config import ModelConfig
from lorascope.model.lora import HostAdapter


class AdapterSource(Protocol):
    def names(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def load(self, name: str, cfg: ModelConfig, max_rank: int, dtype: torch.dtype) -> HostAdapter: ...


class DirectorySource:
    def __init__(self, adapters: dict[str, Path] | None = None, load_latency_s: float = 0.0):
        self._paths: dict[str, Path] = dict(adapters or {})
        self._lock = threading.Lock()
        self.load_latency_s = load_latency_s

    @classmethod
    def from_root(cls, root: Path, load_latency_s: float = 0.0) -> DirectorySource:
        if not root.is_dir():
            raise AdapterError(f"adapter directory {root} does not exist; create adapters with `lorascope adapters make {root} ...`")
        return cls(list_adapter_dirs(root), load_latency_s)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._paths

    def path(self, name: str) -> Path:
        with self._lock:
            return self._paths[name]

    def add(self, name: str, path: Path) -> None:
        with self._lock:
            if name in self._paths:
                raise AdapterError(f"adapter {name!r} is already registered (at {self._paths[name]}); unload it first")
            self._paths[name] = path

    def remove(self, name: str) -> None:
        with self._lock:
            if self._paths.pop(name, None) is None:
                raise AdapterError(f"adapter {name!r} is not registered")

    def load(self, name: str, cfg: ModelConfig, max_rank: int, dtype: torch.dtype) -> HostAdapter:
        if self.load_latency_s:
            time.sleep(self.load_latency_s)
        return read_peft_adapter(self.path(name), cfg, max_rank, name=name, dtype=dtype)


SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_GRAMMAR = "synthetic:COUNT[:RANK[:LATENCY_MS[:SEED]]]"
_DEFAULT_RANK = 16
_DEFAULT_TARGETS = ("q_proj", "v_proj")


class SyntheticSource:
    """`count` synthetic adapters a0000, a0001, ..., generated on every load, never stored.

    Adapter i is exactly adapter i of `make_adapters(out, model, count, rank, targets, alpha, seed)`
    as `read_peft_adapter` reads it back (same tensors, scales and rank, in the load's dtype), and
    depends only on (seed, i): not on count. A list of ranks cycles (adapter i has rank
    ranks[i % len(ranks)]); alpha defaults to 2 * rank. `load_latency_s` is slept before each
    generation (remote storage stand-in). Immutable after construction, so loads may run on any
    number of threads at once.

    A load is a few large torch ops (synthetic.py), so loader threads seldom take the GIL from the
    engine thread, and its tensors are views of one buffer. With `pin_memory` (default: when CUDA
    is available) that buffer is page-locked, so the adapter cache's per-tensor pin_memory() finds
    them pinned and neither allocates nor copies.
    """

    def __init__(
        self,
        count: int,
        rank: int | list[int] = _DEFAULT_RANK,
        targets: list[str] | tuple[str, ...] = _DEFAULT_TARGETS,
        alpha: float | None = None,
        seed: int = 0,
        load_latency_s: float = 0.0,
        pin_memory: bool | None = None,
    ):
        self._ranks, self._targets = check_synthetic(count, rank, list(targets), alpha, "the synthetic source")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed {seed!r} is invalid; give an integer >= 0")
        if not (math.isfinite(load_latency_s) and load_latency_s >= 0):
            raise ValueError(f"load latency {load_latency_s!r} s is invalid; give a number of seconds >= 0")
        self.count, self.alpha, self.seed, self.load_latency_s = count, alpha, seed, float(load_latency_s)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._width = max(4, len(str(count - 1)))  # adapter_names' zero padding

    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    @classmethod
    def parse(cls, spec: str, default_latency_s: float = 0.0) -> SyntheticSource:
        """A source from `synthetic:COUNT[:RANK[:LATENCY_MS[:SEED]]]`.

        COUNT: adapters, >= 1. RANK: a rank >= 1 or a comma list cycled over adapters (8,16);
        default 16. LATENCY_MS: injected per-load latency in milliseconds, >= 0; default
        `default_latency_s` (the engine's adapter_load_latency_s). SEED: integer >= 0, default 0.
        An empty field takes its default (synthetic:1000::20). Targets are q_proj,v_proj and alpha
        is 2 * rank; construct SyntheticSource directly for others. Raises ValueError naming the
        field and the grammar.
        """
        if not isinstance(spec, str) or not spec.startswith(SYNTHETIC_PREFIX):
            raise ValueError(f"adapter spec {spec!r} is not a synthetic source; write it as {SYNTHETIC_GRAMMAR}")
        fields = spec[len(SYNTHETIC_PREFIX):].split(":")
        if len(fields) > 4:
            raise ValueError(f"adapter spec {spec!r} has {len(fields)} fields, at most 4 are allowed: {SYNTHETIC_GRAMMAR}")
        fields += [""] * (4 - len(fields))
        count_s, rank_s, latency_s, seed_s = (f.strip() for f in fields)

        def bad(what: str, value: str, want: str) -> ValueError:
            return ValueError(f"{what} {value!r} in adapter spec {spec!r} is invalid; {what} must be {want}: {SYNTHETIC_GRAMMAR}")

        count = _int(count_s)
        if count is None or count < 1:
            raise bad("COUNT", count_s, "a positive integer")
        ranks: list[int] | int = _DEFAULT_RANK
        if rank_s:
            parsed = [_int(r.strip()) for r in rank_s.split(",")]
            if any(r is None or r < 1 for r in parsed):
                raise bad("RANK", rank_s, "a positive integer or a comma list of them (e.g. 16 or 8,16)")
            ranks = [r for r in parsed if r is not None]
        latency = default_latency_s
        if latency_s:
            try:
                ms = float(latency_s)
            except ValueError:
                ms = math.nan
            if not (math.isfinite(ms) and ms >= 0):
                raise bad("LATENCY_MS", latency_s, "a number of milliseconds >= 0")
            latency = ms / 1000.0
        seed = 0
        if seed_s:
            parsed_seed = _int(seed_s)
            if parsed_seed is None or parsed_seed < 0:
                raise bad("SEED", seed_s, "an integer >= 0")
            seed = parsed_seed
        return cls(count, ranks, _DEFAULT_TARGETS, seed=seed, load_latency_s=latency)

    def spec(self) -> str:
        """The spec string for this source (targets and alpha are not part of it)."""
        return f"{SYNTHETIC_PREFIX}{self.count}:{','.join(map(str, self._ranks))}:{self.load_latency_s * 1000:g}:{self.seed}"

    def index(self, name: str) -> int | None:
        """Adapter `name`'s index, or None when this source has no such adapter."""
        digits = name[1:] if isinstance(name, str) and name.startswith("a") else ""
        if len(digits) != self._width or not digits.isascii() or not digits.isdigit():
            return None
        i = int(digits)
        return i if i < self.count else None

    def names(self) -> list[str]:
        return adapter_names(self.count)

    def has(self, name: str) -> bool:
        return self.index(name) is not None

    def rank_of(self, name: str) -> int:
        return self._ranks[self._require(name) % len(self._ranks)]

    def _require(self, name: str) -> int:
        i = self.index(name)
        if i is None:
            first, last = f"a{0:0{self._width}d}", f"a{self.count - 1:0{self._width}d}"
            raise AdapterError(
                f"adapter {name!r} is not in the synthetic source ({self.count} adapters, {first}..{last}); "
                f"use one of those names, or a larger COUNT in {SYNTHETIC_GRAMMAR}"
            )
        return i

    def load(self, name: str, cfg: ModelConfig, max_rank: int, dtype: torch.dtype) -> HostAdapter:
        index = self._require(name)
        r = self._ranks[index % len(self._ranks)]
        if r > max_rank:  # checked before the latency, as read_peft_adapter checks before reading weights
            raise AdapterError(
                f"adapter {name!r} ({self.spec()}): r={r} is above max_lora_rank={max_rank}; "
                f"raise --max-lora-rank to at least {r}, or lower RANK in the spec"
            )
        if self.load_latency_s:
            time.sleep(self.load_latency_s)
        r, alpha, weights = synthetic_adapter(cfg, self._ranks, self._targets, self.alpha, self.seed, index, dtype, self.pin_memory)
        # read_peft_adapter's layout: keys in (layer, module) order, one scale per module, the real rank.
        return HostAdapter(name=name, weights=weights, scales=dict.fromkeys(self._targets, alpha / r), rank=r)


def _int(text: str) -> int | None:
    """A plain decimal integer (optional sign, digits only), else None."""
    body = text[1:] if text[:1] in "+-" else text
    return int(text) if body.isascii() and body.isdigit() else None
