"""One cell of `lorascope bench`: start the target with the cell's knobs, warm it up, drive the
workload, scrape /metrics meanwhile, and write the run directory (DESIGN.md).

Warm-up (kept in the records, flagged, out of every statistic): one short request per adapter when
`warmup_all_adapters` (so cold loads are not measured as the cell's TTFT), then `warmup` requests
of the workload itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lorascope.adapters.peft import list_adapter_dirs
from lorascope.adapters.synthetic import make_adapters
from lorascope.loadgen.client import ClientRequest, Target, run_cell
from lorascope.loadgen.scrape import Scraper
from lorascope.loadgen.targets import (
    CellKnobs,
    ServerProcess,
    adapters_of,
    embedded_server,
    sglang_model_name,
    sglang_server,
    vllm_server,
)
from lorascope.loadgen.workingset import adapters_for_share, expected_distinct
from lorascope.loadgen.workload import build_workload, parse_traffic
from lorascope.model.weights import load_model, resolve_config, save_model
from lorascope.results.records import RequestRecord, records_frame, write_cell
from lorascope.results.rundir import append_cell_row, finish_manifest, write_manifest, write_server_metrics
from lorascope.results.summary import summarize

ENGINES = ("embedded", "vllm", "sglang", "url")


@dataclass(slots=True)
class BenchSpec:
    engine: str = "embedded"
    model: str = "tiny"
    adapters_dir: Path | None = None  # None: make `num_adapters` synthetic ones in the run directory
    num_adapters: int = 20
    rank: int = 16
    targets: str = "q_proj,v_proj"
    traffic: str = "uniform"
    concurrency: int | None = 8  # closed loop; None: open loop at `rate`
    rate: float | None = None
    arrival: str = "poisson"
    requests: int = 100
    warmup: int = 8
    warmup_all_adapters: bool = True
    input_len: str = "128"
    output_len: str = "128"
    slo_ttft_ms: float | None = None
    seed: int = 0
    cell_id: str = "cell0"
    repetition: int = 0
    url: str | None = None
    vllm_cmd: str = "vllm serve"
    sglang_cmd: str = "python -m sglang.launch_server"
    scrape_interval_s: float = 0.5
    knobs: CellKnobs = field(default_factory=CellKnobs)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency (closed loop) and --rate (open loop)")
        if self.engine == "url" and not self.url:
            raise ValueError("--engine url needs --url http://HOST:PORT")
        if self.requests < 1 or self.warmup < 0:
            raise ValueError(f"--requests must be >= 1 and --warmup >= 0, got {self.requests} and {self.warmup}")
        parse_traffic(self.traffic)  # fail before any server starts


def run_bench(spec: BenchSpec, out: Path, progress: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model_path, adapters = _prepare(spec, out)
    write_manifest(out, _jsonable(spec), {"name": spec.engine}, sys.argv)
    with _start(spec, model_path, adapters, out) as base_url:
        if spec.engine == "sglang":  # it may not list adapters in /v1/models: use what it was given
            base, names = "base", sorted(adapters)
        else:
            base, names = adapters_of(base_url)
            names = names[: spec.num_adapters] if spec.adapters_dir is None else names
        if not names:
            raise ValueError(f"the server at {base_url} lists no adapters")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task(f"{spec.cell_id} rep {spec.repetition}", total=spec.requests)
            records, overhead, scraper = asyncio.run(
                _drive(spec, base_url, base, names, lambda _record: bar.advance(task))
            )
    write_cell(out, spec.cell_id, spec.repetition, records)
    write_server_metrics(out, spec.cell_id, spec.repetition, scraper.rows)
    summary = summarize(records_frame(records), spec.slo_ttft_ms)
    law = parse_traffic(spec.traffic).probabilities(len(names))
    predicted = {"predicted_distinct": expected_distinct(law, spec.concurrency) if spec.concurrency else None,
                 "adapters_for_50pct": adapters_for_share(law, 0.5), "adapters_for_90pct": adapters_for_share(law, 0.9)}
    row = {"cell_id": spec.cell_id, "repetition": spec.repetition, "engine": spec.engine, "model": spec.model,
           "adapters": len(names), "traffic": spec.traffic, "concurrency": spec.concurrency, "rate": spec.rate,
           "max_loras": spec.knobs.max_loras, "max_cpu_loras": spec.knobs.max_cpu_loras, "policy": spec.knobs.policy,
           **predicted, **summary, **overhead, "scrape_failures": scraper.failures}
    append_cell_row(out, row)
    finish_manifest(out, base_model=base)
    return row


def _prepare(spec: BenchSpec, out: Path) -> tuple[str, dict[str, Path]]:
    """The model path the server loads and the adapters it serves (made here if none are given)."""
    if spec.engine == "url":
        return spec.model, {}
    model_path = spec.model
    if spec.engine in ("vllm", "sglang") and not Path(spec.model).is_dir():  # they need a directory: write the preset
        model_path = str(out / "model")
        if not (out / "model" / "config.json").exists():
            save_model(load_model(spec.model), out / "model")
    if spec.adapters_dir is not None:
        return model_path, list_adapter_dirs(spec.adapters_dir)
    root = out / "adapters"
    if not root.is_dir():
        make_adapters(root, model_path, spec.num_adapters, spec.rank, spec.targets.split(","), seed=spec.seed)
    return model_path, list_adapter_dirs(root)


@contextlib.contextmanager
def _start(spec: BenchSpec, model_path: str, adapters: dict[str, Path], out: Path):
    if spec.engine == "url":
        yield spec.url.rstrip("/")  # type: ignore[union-attr]
        return
    log = out / "logs" / f"{spec.cell_id}-rep{spec.repetition}.log"
    server: ServerProcess
    if spec.engine == "embedded":
        root = spec.adapters_dir or out / "adapters"
        server = embedded_server(model_path, root, spec.knobs, log)
    elif spec.engine == "sglang":
        server = sglang_server(spec.sglang_cmd, model_path, adapters, spec.knobs, log)
    else:
        server = vllm_server(spec.vllm_cmd, model_path, adapters, spec.knobs, log)
    with server:
        yield server.base_url


async def _drive(
    spec: BenchSpec, base_url: str, base: str, names: list[str], on_done: Callable[[RequestRecord], None]
) -> tuple[list[RequestRecord], dict[str, float], Scraper]:
    vocab = resolve_config(spec.model).vocab_size if spec.engine != "url" else 256
    total = spec.warmup + spec.requests
    workload = build_workload(len(names), spec.traffic, total, spec.input_len, spec.output_len, spec.seed,
                              rate=spec.rate, arrival=spec.arrival if spec.rate else None, vocab_size=vocab)
    reqs = []
    for i, w in enumerate(workload):
        name = None if w.adapter < 0 else names[w.adapter]
        model = sglang_model_name(base, name) if spec.engine == "sglang" else name or base
        reqs.append(ClientRequest(i, model, name, w.prompt_token_ids, w.output_len, w.intended_send_s, i < spec.warmup))
    target = Target(base_url)
    warm: list[RequestRecord] = []
    if spec.warmup_all_adapters:
        touch = [ClientRequest(-1 - k, sglang_model_name(base, n) if spec.engine == "sglang" else n, n,
                               reqs[0].prompt_token_ids[:8], 2, None, True) for k, n in enumerate(names)]
        warm, _ = await run_cell(target, touch, spec.cell_id, spec.repetition, concurrency=spec.concurrency or 8)
    if spec.warmup:
        more, _ = await run_cell(target, reqs[: spec.warmup], spec.cell_id, spec.repetition, concurrency=spec.concurrency or 8)
        warm += more
    measured = reqs[spec.warmup :]
    if spec.rate:  # open loop: intended times restart at the measured part's first request
        offset = measured[0].intended_send_s or 0.0
        for r in measured:
            r.intended_send_s = (r.intended_send_s or 0.0) - offset
    scraper = Scraper(base_url, spec.cell_id, spec.repetition, spec.scrape_interval_s)
    scrape_task = asyncio.get_running_loop().create_task(scraper.run(time.monotonic()))
    try:
        records, overhead = await run_cell(target, measured, spec.cell_id, spec.repetition, spec.concurrency, on_done)
    finally:
        scrape_task.cancel()
    return warm + records, overhead, scraper


def _jsonable(spec: BenchSpec) -> dict[str, Any]:
    d = asdict(spec)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
