"""One cell of `lorascope bench`: start the target with the cell's knobs, warm it up, drive the
workload, scrape /metrics meanwhile, and write the run directory (DESIGN.md).

Warm-up (kept in the records, flagged, out of every statistic), by `warmup_mode`:
- `all`: one short request per adapter (so cold loads are not measured as the cell's TTFT), then
  `warmup` requests of the workload itself;
- `workload`: only the `warmup` workload requests;
- `auto`: `all` when every adapter fits the host tier (max_cpu_loras, or max_loras when unset) so
  the touches stay resident, else `workload` (touching 1,000 adapters that a 32-adapter tier evicts
  again warms nothing). The mode used is recorded in the cell's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pandas as pd
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lorascope.adapters.peft import list_adapter_dirs
from lorascope.adapters.synthetic import make_adapters
from lorascope.loadgen.client import ClientRequest, Target, run_cell
from lorascope.loadgen.scrape import Scraper, active_summary, memory_summary
from lorascope.loadgen.targets import (
    CellKnobs,
    ServerProcess,
    adapters_of,
    embedded_server,
    sglang_model_name,
    sglang_server,
    vllm_server,
)
from lorascope.loadgen.workingset import adapters_for_share, distinct_quantile, expected_distinct
from lorascope.loadgen.workload import build_workload, parse_traffic
from lorascope.model.config import LORA_TARGET_MODULES
from lorascope.model.weights import load_model, resolve_config, save_model
from lorascope.results.records import RequestRecord, records_frame, write_cell
from lorascope.results.rundir import (
    finish_manifest,
    write_cells_csv,
    write_manifest,
    write_server_metrics,
    write_summary,
)
from lorascope.results.summary import summarize

ENGINES = ("embedded", "vllm", "sglang", "url")
WARMUP_MODES = ("all", "workload", "auto")


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
    warmup_mode: str = "all"  # all | workload | auto (module docstring)
    input_len: str = "128"
    output_len: str = "128"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0
    sweep: str = ""
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
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"warmup mode must be one of {WARMUP_MODES}, got {self.warmup_mode!r}")
        parse_traffic(self.traffic)  # fail before any server starts


def run_bench(spec: BenchSpec, out: Path, progress: bool = True) -> dict[str, Any]:
    """One cell into `out` (the `bench` command). Several calls with distinct cell ids share a directory."""
    out.mkdir(parents=True, exist_ok=True)
    model_path, adapters = _prepare(spec, out)
    write_manifest(out, _jsonable(spec), {"name": spec.engine, "version": engine_version(spec)}, sys.argv)
    with Progress(*progress_columns(), disable=not progress, transient=True) as bar:
        row = measure_cell(spec, out, model_path, adapters, spec.adapters_dir or out / "adapters", bar)
    write_cells_csv(out)
    finish_manifest(out, base_model=row["base_model"])
    return row


def progress_columns() -> tuple[Any, ...]:
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn())


def measure_cell(spec: BenchSpec, out: Path, model_path: str, adapters: dict[str, Path], adapters_root: Path,
                 bar: Progress | None = None) -> dict[str, Any]:
    """Start the target with the cell's knobs, warm it up, drive the workload, scrape /metrics, stop it,
    and write the cell: server metrics, then its summary, then its records (the file whose presence
    marks the cell finished). Returns the summary row."""
    with _start(spec, model_path, adapters, adapters_root, out) as base_url:
        if spec.engine == "sglang":  # it may not list adapters in /v1/models: use what it was given
            base, names = "base", sorted(adapters)
        else:
            base, names = adapters_of(base_url)
            names = names[: spec.num_adapters] if spec.adapters_dir is None else names
        if not names:
            raise ValueError(f"the server at {base_url} lists no adapters")
        task = bar.add_task(f"  {spec.cell_id} rep {spec.repetition}", total=spec.requests) if bar else None
        on_done = (lambda _record: bar.advance(task)) if bar is not None and task is not None else (lambda _r: None)
        try:
            records, overhead, scraper, warm_mode = asyncio.run(_drive(spec, base_url, base, names, on_done))
        finally:
            if bar is not None and task is not None:
                bar.remove_task(task)
    metrics = pd.DataFrame(scraper.rows, columns=["cell_id", "repetition", "t_s", "metric", "labels", "value"])
    write_server_metrics(out, spec.cell_id, spec.repetition, scraper.rows)
    summary = summarize(records_frame(records), spec.slo_ttft_ms, spec.slo_tpot_ms)
    law = parse_traffic(spec.traffic).probabilities(len(names))
    predicted = {"predicted_distinct": expected_distinct(law, spec.concurrency) if spec.concurrency else None,
                 "predicted_p90_distinct": distinct_quantile(law, spec.concurrency, 0.9) if spec.concurrency else None,
                 "adapters_for_50pct": adapters_for_share(law, 0.5), "adapters_for_90pct": adapters_for_share(law, 0.9)}
    memory = memory_summary(metrics)
    memory = ({**memory, "mem_source": "measured"} if memory
              else {**estimate_memory(spec, model_path, adapters, metrics), "mem_source": "estimated"})
    row = {"sweep": spec.sweep, "cell_id": spec.cell_id, "repetition": spec.repetition, "engine": spec.engine,
           "model": spec.model, "base_model": base, "adapters": len(names), "rank": spec.rank, "traffic": spec.traffic,
           "concurrency": spec.concurrency, "rate": spec.rate, "arrival": spec.arrival if spec.rate else None,
           "input_len": spec.input_len, "output_len": spec.output_len, "max_loras": spec.knobs.max_loras,
           "max_cpu_loras": spec.knobs.max_cpu_loras, "max_lora_rank": spec.knobs.max_lora_rank,
           "policy": spec.knobs.policy if spec.engine == "embedded" else spec.engine,
           "warmup_mode": warm_mode, "slo_ttft_ms": spec.slo_ttft_ms, "slo_tpot_ms": spec.slo_tpot_ms,
           **predicted, **active_summary(metrics), **memory, **summary, **overhead,
           "scrape_failures": scraper.failures, "finished_at": time.time()}
    write_summary(out, spec.cell_id, spec.repetition, row)
    write_cell(out, spec.cell_id, spec.repetition, records)
    return row


def engine_version(spec: BenchSpec) -> str:
    """The serving engine's version, for the manifest (best effort: "unknown" when it cannot be asked)."""
    if spec.engine == "embedded":
        from lorascope.results.rundir import lorascope_version

        return lorascope_version()
    if spec.engine == "vllm":
        cmd = shlex.split(spec.vllm_cmd)
        python = cmd[0] if cmd[0].endswith(("python", "python3")) else str(Path(shutil.which(cmd[0]) or cmd[0]).parent / "python")
        probe = [python, "-c", "import vllm; print(vllm.__version__)"]
    elif spec.engine == "sglang":
        probe = [*shlex.split(spec.sglang_cmd)[:1], "-c", "import sglang; print(sglang.__version__)"]
    else:
        return "unknown"
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=120)
        return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def estimate_memory(spec: BenchSpec, model_path: str, adapters: dict[str, Path], metrics: pd.DataFrame) -> dict[str, float]:
    """Memory by component for an engine that does not report it (vLLM, SGLang): weights from the
    parameter count, adapter slots as vLLM allocates them (max_loras x max_lora_rank for every
    LoRA-capable module, whatever the adapters target), the host tier full, the KV cache from
    vLLM's `cache_config_info` when it is scraped."""
    try:
        cfg = resolve_config(model_path)
    except ValueError:
        return {}
    nbytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(spec.knobs.dtype, 2)
    slots = spec.knobs.max_loras * spec.knobs.max_lora_rank * cfg.num_hidden_layers * nbytes * sum(
        sum(cfg.module_shape(m)) for m in LORA_TARGET_MODULES)
    sizes = sorted(f.stat().st_size for p in adapters.values() for f in p.glob("*.safetensors"))
    host = min(spec.knobs.max_cpu_loras or spec.knobs.max_loras, len(adapters)) * (sizes[len(sizes) // 2] if sizes else 0)
    kv = float("nan")
    info = metrics[metrics["metric"] == "vllm:cache_config_info"]
    if not info.empty:
        labels = json.loads(str(info.iloc[-1]["labels"]))
        blocks = labels.get("num_gpu_blocks") or labels.get("num_cpu_blocks")
        if blocks not in (None, "None") and labels.get("block_size"):
            kv = float(int(blocks) * int(labels["block_size"]) * 2 * cfg.num_hidden_layers * cfg.kv_size * nbytes)
    return {"mem_weights_bytes": float(cfg.num_parameters() * nbytes), "mem_kv_cache_bytes": kv,
            "mem_adapter_slots_bytes": float(slots), "mem_host_tier_bytes": float(host)}


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
def _start(spec: BenchSpec, model_path: str, adapters: dict[str, Path], adapters_root: Path, out: Path):
    if spec.engine == "url":
        yield spec.url.rstrip("/")  # type: ignore[union-attr]
        return
    log = out / "logs" / f"{spec.cell_id}-rep{spec.repetition}.log"
    server: ServerProcess
    if spec.engine == "embedded":
        server = embedded_server(model_path, adapters_root, spec.knobs, log)
    elif spec.engine == "sglang":
        server = sglang_server(spec.sglang_cmd, model_path, adapters, spec.knobs, log)
    else:
        server = vllm_server(spec.vllm_cmd, model_path, adapters, spec.knobs, log)
    with server:
        yield server.base_url


async def _drive(
    spec: BenchSpec, base_url: str, base: str, names: list[str], on_done: Callable[[RequestRecord], None]
) -> tuple[list[RequestRecord], dict[str, float], Scraper, str]:
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
    mode = spec.warmup_mode
    if mode == "auto":
        mode = "all" if len(names) <= (spec.knobs.max_cpu_loras or spec.knobs.max_loras) else "workload"
    if mode == "all":
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
    scrape_t0 = time.monotonic()
    scrape_task = asyncio.get_running_loop().create_task(scraper.run(scrape_t0))
    try:
        records, overhead = await run_cell(target, measured, spec.cell_id, spec.repetition, spec.concurrency, on_done)
    finally:
        scrape_task.cancel()
    async with aiohttp.ClientSession() as session:  # the state at the end of the measured requests
        await scraper.scrape_once(session, scrape_t0)
    return warm + records, overhead, scraper, mode


def _jsonable(spec: BenchSpec) -> dict[str, Any]:
    d = asdict(spec)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
