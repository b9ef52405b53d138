"""Scrape a server's Prometheus `/metrics` during a cell, into rows for `server_metrics.parquet`.

One row per sample: (cell_id, repetition, t_s, metric, labels as JSON, value). Every family is kept
(vLLM's `vllm:lora_requests_info` with its labels, lorascope's own), so adapter state over time
can be drawn later without re-running. vLLM's LoRA gauge makes a new series per combination of
adapters and sets its value to a Unix time: readers take the newest sample (`latest_lora_info`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

LORA_INFO = "vllm:lora_requests_info"


@dataclass(slots=True)
class Scraper:
    base_url: str
    cell_id: str
    repetition: int
    interval_s: float = 0.5
    api_key: str | None = None
    rows: list[dict[str, object]] = field(default_factory=list)
    failures: int = 0

    async def scrape_once(self, session: aiohttp.ClientSession, t0: float) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with session.get(f"{self.base_url}/metrics", headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=10)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            self.failures += 1
            return
        t_s = time.monotonic() - t0
        self.rows += parse_samples(text, self.cell_id, self.repetition, t_s)

    async def run(self, t0: float) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await self.scrape_once(session, t0)
                await asyncio.sleep(self.interval_s)


def parse_samples(text: str, cell_id: str, repetition: int, t_s: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            rows.append({"cell_id": cell_id, "repetition": repetition, "t_s": t_s, "metric": sample.name,
                         "labels": json.dumps(sample.labels, sort_keys=True), "value": float(sample.value)})
    return rows


def latest_lora_info(rows: list[dict[str, object]]) -> dict[str, list[str]] | None:
    """vLLM's LoRA gauge at the last scrape: its newest series (largest timestamp value)."""
    if not rows:
        return None
    last_t = max(r["t_s"] for r in rows)  # type: ignore[type-var]
    series = [r for r in rows if r["metric"] == LORA_INFO and r["t_s"] == last_t]
    if not series:
        return None
    labels = json.loads(str(max(series, key=lambda r: r["value"])["labels"]))  # type: ignore[arg-type, return-value]
    split = lambda v: [a for a in v.split(",") if a]  # noqa: E731
    return {"running": split(labels.get("running_lora_adapters", "")),
            "waiting": split(labels.get("waiting_lora_adapters", "")),
            "max_lora": [labels.get("max_lora", "")]}
