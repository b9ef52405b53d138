"""Prometheus metrics of one server: vLLM's LoRA gauge plus lorascope's own (docs/metrics.md).

State metrics (adapters, queues, KV blocks, cache counters) are computed at scrape time from one
engine snapshot, so every scrape is consistent and `vllm:lora_requests_info` shows only the current
combination of adapters (vLLM keeps every past combination as a separate series). Event metrics
(latencies, tokens, adapters per step) are fed by engine hooks, which run on the engine thread;
prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lorascope.engine.async_engine import AsyncLLMEngine, Snapshot
from lorascope.engine.engine import StepRecord
from lorascope.engine.request import Request

MAX_ADAPTER_LABELS = 64  # above this many adapters, per-adapter series would make scrapes unbounded
OTHER = "other"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MetricT = TypeVar("MetricT", Counter, Histogram)
ADAPTER_BUCKETS = (*range(0, 65), 96, 128, 192, 256, 384, 512, 1024)  # exact counts up to 64: p90 needs them


class SnapshotCollector(Collector):
    """Yields the state metrics of the latest snapshot (set by the /metrics handler just before)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if s is None:
            return
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running and waiting LoRA adapters (value: Unix time of this scrape)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric([",".join(s.running_adapters), ",".join(s.waiting_adapters), str(s.max_loras)], time.time())
        yield info
        resident = GaugeMetricFamily("lorascope:adapters_resident", "Adapters held in a tier", labels=["tier"])
        resident.add_metric(["device"], len(s.device_resident))
        resident.add_metric(["host"], len(s.host_resident))
        yield resident
        yield _gauge("lorascope:num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting)
        yield _gauge("lorascope:num_requests_running", "Requests in the running batch", s.num_running)
        yield _gauge("lorascope:kv_blocks_used", "KV-cache blocks held by requests", s.kv_blocks_used)
        yield _gauge("lorascope:kv_blocks_total", "KV-cache blocks in the pool", s.kv_blocks_total)
        yield _gauge("lorascope:adapter_refs", "Adapter references held by in-flight requests", s.adapter_refs)
        yield _gauge("lorascope:max_loras", "Device adapter slots (max_loras)", s.max_loras)
        memory = GaugeMetricFamily("lorascope:memory_bytes", "Bytes held, by component (adapter_slots: allocated "
                                   "for max_loras x max_lora_rank; host_tier: adapters held now)", labels=["component"])
        for component, value in s.memory_bytes.items():
            memory.add_metric([component], float(value))
        yield memory
        yield from _tier_counters(s)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _tier_counters(s: Snapshot) -> Iterator[Metric]:
    specs = {
        "loads": "Adapters loaded into the tier",
        "load_seconds": "Seconds spent loading adapters into the tier",
        "evictions": "Adapters evicted from the tier",
        "hits": "Lookups that found the adapter in the tier",
        "misses": "Lookups that did not find the adapter in the tier",
    }
    for key, doc in specs.items():
        family = CounterMetricFamily(f"lorascope:adapter_{key}", doc, labels=["tier"])
        for tier in ("device", "host"):
            counters = s.cache.get(tier, {})
            family.add_metric([tier], float(counters.get(key, 0)))
        yield family


def _child(metric: MetricT, labels: tuple[str, ...]) -> MetricT:
    return metric.labels(*labels) if labels else metric


class ServerMetrics:
    """The registry of one app, its collectors and the hooks that feed them."""

    def __init__(self, engine: AsyncLLMEngine, served_model_name: str):
        self.engine = engine
        self.served_model_name = served_model_name
        self.registry = CollectorRegistry()
        self.state = SnapshotCollector()
        self.registry.register(self.state)
        # decided once: a label set must not change while the server runs
        self.by_adapter = len(engine.adapter_names()) <= MAX_ADAPTER_LABELS
        self._labels_seen: set[str] = set()
        self._lock = threading.Lock()
        labels = ["adapter"] if self.by_adapter else []
        r = self.registry
        self.step_adapters = Histogram("lorascope:step_adapters", "Distinct adapters in one engine step",
                                       buckets=ADAPTER_BUCKETS, registry=r)
        self.ttft = Histogram("lorascope:time_to_first_token_seconds", "Arrival to first token, seconds",
                              labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("lorascope:e2e_request_latency_seconds", "Arrival to finish, seconds",
                             labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("lorascope:prompt_tokens", "Prompt tokens of finished requests", labels, registry=r)
        self.generation_tokens = Counter("lorascope:generation_tokens", "Tokens generated by finished requests",
                                         labels, registry=r)
        self.finished = Counter("lorascope:requests_finished", "Requests finished, by reason",
                                ["finish_reason"], registry=r)

    def install(self) -> None:
        self.engine.step_hooks.append(self.on_step)
        self.engine.finish_hooks.append(self.on_finish)

    def uninstall(self) -> None:
        for hooks, hook in ((self.engine.step_hooks, self.on_step), (self.engine.finish_hooks, self.on_finish)):
            if hook in hooks:
                hooks.remove(hook)

    def on_step(self, record: StepRecord) -> None:
        self.step_adapters.observe(record.num_adapters)

    def on_finish(self, req: Request) -> None:
        reason = req.finish_reason or "unknown"
        self.finished.labels(reason).inc()
        labels = self._adapter_labels(req.adapter)
        _child(self.prompt_tokens, labels).inc(len(req.prompt_ids))
        _child(self.generation_tokens, labels).inc(len(req.output_ids))
        if reason == "abort":  # a client that left: its latency says nothing about the server
            return
        if req.first_token_time is not None:
            _child(self.ttft, labels).observe(req.first_token_time - req.arrival_time)
        if req.finish_time is not None:
            _child(self.e2e, labels).observe(req.finish_time - req.arrival_time)

    def _adapter_labels(self, adapter: str | None) -> tuple[str, ...]:
        if not self.by_adapter:
            return ()
        name = adapter or self.served_model_name
        with self._lock:  # runtime loads may add adapters: still never more than 64 label values
            if name not in self._labels_seen and len(self._labels_seen) >= MAX_ADAPTER_LABELS:
                return (OTHER,)
            self._labels_seen.add(name)
        return (name,)

    async def render(self) -> bytes:
        self.state.snapshot = await self.engine.snapshot()
        return generate_latest(self.registry)
