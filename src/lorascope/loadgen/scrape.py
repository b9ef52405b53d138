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
import pandas as pd
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


STEP_ADAPTERS = "lorascope:step_adapters"


def _lora_info_running(frame: pd.DataFrame) -> pd.DataFrame:
    """vLLM's gauge: per scrape, the running adapters of its newest series (t_s, running count)."""
    info = frame[frame["metric"] == LORA_INFO]
    if info.empty:
        return pd.DataFrame(columns=["t_s", "active"])
    newest = info.loc[info.groupby("t_s")["value"].idxmax()]
    running = newest["labels"].map(lambda s: len([a for a in json.loads(s).get("running_lora_adapters", "").split(",") if a]))
    return pd.DataFrame({"t_s": newest["t_s"].to_numpy(), "active": running.to_numpy()})


def active_series(frame: pd.DataFrame) -> pd.DataFrame:
    """Active (distinct) adapters per step over time, from one cell's scraped samples: (t_s, active).

    The embedded engine: the mean of its `lorascope:step_adapters` histogram between two scrapes
    (exact, every step counted). Other engines: the running adapters that vLLM's LoRA gauge lists at
    each scrape (a sample, not every step).
    """
    count = frame[frame["metric"] == f"{STEP_ADAPTERS}_count"].sort_values("t_s")
    total = frame[frame["metric"] == f"{STEP_ADAPTERS}_sum"].sort_values("t_s")
    if len(count) >= 2 and len(count) == len(total):
        dc, ds = count["value"].diff().to_numpy()[1:], total["value"].diff().to_numpy()[1:]
        keep = dc > 0
        return pd.DataFrame({"t_s": count["t_s"].to_numpy()[1:][keep], "active": ds[keep] / dc[keep]})
    return _lora_info_running(frame)


def active_summary(frame: pd.DataFrame) -> dict[str, float | str]:
    """Mean and p90 of the distinct adapters per step over one cell, and where they come from."""
    buckets = frame[frame["metric"] == f"{STEP_ADAPTERS}_bucket"]
    if not buckets.empty and buckets["t_s"].nunique() >= 2:
        first, last = buckets["t_s"].min(), buckets["t_s"].max()
        le = buckets["labels"].map(lambda s: float(json.loads(s)["le"]))
        at = lambda t: buckets[buckets["t_s"] == t].assign(le=le).set_index("le")["value"].sort_index()  # noqa: E731
        delta = at(last) - at(first)
        steps = float(delta.iloc[-1])
        if steps > 0:
            count = frame[frame["metric"] == f"{STEP_ADAPTERS}_sum"]
            total = float(count[count["t_s"] == last]["value"].sum() - count[count["t_s"] == first]["value"].sum())
            p90 = float(delta.index[(delta >= 0.9 * steps).to_numpy().argmax()])
            return {"active_adapters_mean": total / steps, "active_adapters_p90": p90, "active_adapters_source": "every step"}
    running = _lora_info_running(frame)
    running = running[running["active"] > 0]
    if running.empty:
        return {"active_adapters_mean": float("nan"), "active_adapters_p90": float("nan"), "active_adapters_source": "none"}
    return {"active_adapters_mean": float(running["active"].mean()),
            "active_adapters_p90": float(running["active"].quantile(0.9, interpolation="higher")),
            "active_adapters_source": "scrapes of vllm:lora_requests_info"}


def memory_summary(frame: pd.DataFrame) -> dict[str, float]:
    """The embedded engine's `lorascope:memory_bytes` by component (host tier: its peak), or {}."""
    mem = frame[frame["metric"] == "lorascope:memory_bytes"]
    if mem.empty:
        return {}
    comp = mem["labels"].map(lambda s: json.loads(s)["component"])
    peak = mem.groupby(comp)["value"].max()
    return {f"mem_{k}_bytes": float(v) for k, v in peak.items()}
