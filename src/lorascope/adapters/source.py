"""Adapter sources: where the disk tier reads an adapter from.

`DirectorySource` reads PEFT directories (validated on every read). An optional injected
per-load latency stands in for remote storage, so the tiers can be studied with slow loads.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol

import torch

from lorascope.adapters.peft import AdapterError, list_adapter_dirs, read_peft_adapter
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
