"""Eviction policies for the adapter tiers: which resident adapter leaves when room is needed.

A policy only orders names; the tier decides which names are candidates (e.g. adapters with
running requests are never offered). Kept this small so policies stay an experimental variable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    def mark_used(self, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def select_victim(self, candidates: Iterable[str]) -> str | None: ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def mark_used(self, name: str) -> None:
        self._order[name] = None
        self._order.move_to_end(name)

    def remove(self, name: str) -> None:
        self._order.pop(name, None)

    def select_victim(self, candidates: Iterable[str]) -> str | None:
        allowed = set(candidates)
        return next((name for name in self._order if name in allowed), None)


class FIFOPolicy(LRUPolicy):
    """First loaded first out: use does not refresh an adapter's place."""

    def mark_used(self, name: str) -> None:
        if name not in self._order:
            self._order[name] = None


def make_policy(name: str) -> EvictionPolicy:
    policies = {"lru": LRUPolicy, "fifo": FIFOPolicy}
    if name not in policies:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(policies)}")
    return policies[name]()
