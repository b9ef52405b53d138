"""`lorascope tune`: the recommendation of analysis.tune, printed, and optionally measured (docs/tune.md).

cli.py registers it: ``app.command("tune")(_clean_errors(tune))``. ValueError = bad input (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lorascope.analysis.tune import candidates, confirm, recommend

console = Console()


def tune(
    adapters: Annotated[int, typer.Option(help="adapters served (N)")],
    traffic: Annotated[str, typer.Option(help="uniform | zipf:S | power:A | hotset:F:P | drift:LAW:PERIOD")],
    concurrency: Annotated[int, typer.Option(help="requests in flight (c)")],
    slo_ttft_ms: Annotated[
        float | None, typer.Option(help="p99 TTFT SLO: then at most 1% of requests may wait")
    ] = None,
    policy: Annotated[str, typer.Option(help="vllm | fair (the embedded engine's admission policy)")] = "vllm",
    host_memory_gb: Annotated[
        float | None, typer.Option(help="host memory for the CPU adapter tier (GB, 1e9 B)")
    ] = None,
    adapter_mb: Annotated[
        float | None, typer.Option(help="size of one adapter (MB, 1e6 B), with --host-memory-gb")
    ] = None,
    measure: Annotated[bool, typer.Option(help="run one bench cell per candidate max_loras and check")] = False,
    engine: Annotated[str, typer.Option(help="with --measure: embedded | vllm | sglang")] = "embedded",
    model: Annotated[str, typer.Option(help="with --measure: preset or Hugging Face directory")] = "tiny",
    requests: Annotated[int, typer.Option(help="with --measure: measured requests per cell")] = 64,
    input_len: Annotated[str, typer.Option(help="with --measure: L | uniform:LO:HI | ...")] = "64",
    output_len: Annotated[str, typer.Option(help="with --measure: L | uniform:LO:HI | ...")] = "32",
    repetitions: Annotated[int, typer.Option(help="with --measure: runs per candidate (interleaved; medians)")] = 1,
    out: Annotated[
        Path | None, typer.Option(help="with --measure: a new run directory (default runs/tune-TIME)")
    ] = None,
) -> None:
    """Recommend max_loras and max_cpu_loras for a traffic shape; --measure checks it on an engine."""
    if (host_memory_gb is None) != (adapter_mb is None):
        raise ValueError("give both --host-memory-gb and --adapter-mb, or neither")
    if adapter_mb is not None and not adapter_mb > 0:
        raise ValueError(f"--adapter-mb must be > 0, got {adapter_mb}")
    if measure and (requests < 1 or repetitions < 1):
        raise ValueError(f"--requests and --repetitions must be >= 1, got {requests} and {repetitions}")
    adapter_bytes = None if adapter_mb is None else max(1, round(adapter_mb * 1e6))
    rec = recommend(adapters, traffic, concurrency, slo_ttft_ms, policy, adapter_bytes, host_memory_gb)

    table = Table(title=f"{rec.traffic} over {adapters} adapters, {concurrency} in flight: who finds no slot")
    for col in ("max_loras", "requests waiting", "steps overflowing"):
        table.add_column(col, justify="right")
    for row in rec.table:
        mark = " <" if row.max_loras == rec.max_loras else ""
        table.add_row(
            f"{row.max_loras}{mark}", f"{100 * row.delayed_fraction:.2f}%", f"{100 * row.overflow_fraction:.1f}%"
        )
    console.print(table)
    console.print(
        f"recommended: --max-loras {rec.max_loras} --max-cpu-loras {rec.max_cpu_loras} "
        f"(distinct in flight: mean {rec.expected_distinct:.1f}, p90 {rec.p90_distinct}, p99 {rec.p99_distinct}; "
        f"host hit ratio {100 * rec.host_hit_ratio:.1f}%)"
    )
    console.print(rec.explanation)
    if not measure:
        return

    import time

    from lorascope.bench import BenchSpec, run_bench
    from lorascope.loadgen.targets import CellKnobs

    out = out or Path("runs") / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "cells.csv").exists():
        raise ValueError(f"{out} already holds measured cells; pick a new --out")
    runs: list[dict[str, Any]] = []
    for rep, ml in ((rep, ml) for rep in range(repetitions) for ml in candidates(rec)):
        knobs = CellKnobs(max_loras=ml, max_cpu_loras=max(rec.max_cpu_loras, ml), policy=policy)
        spec = BenchSpec(
            engine=engine,
            model=model,
            num_adapters=adapters,
            traffic=traffic,
            concurrency=concurrency,
            requests=requests,
            input_len=input_len,
            output_len=output_len,
            slo_ttft_ms=slo_ttft_ms,
            cell_id=f"tune-ml{ml}",
            repetition=rep,
            seed=rep,
            knobs=knobs,
        )
        console.print(f"measuring max_loras {ml} (run {rep + 1} of {repetitions}) ...")
        runs.append(run_bench(spec, out))
    rows = _medians(runs)
    measured = Table(title=f"{engine} · {rec.traffic} over {adapters} adapters · c={concurrency}")
    for col in ("max_loras", "max_cpu_loras", "out tok/s", "TTFT p50 / p99 ms", "predicted waiting"):
        measured.add_column(col, justify="right")
    for r in rows:
        measured.add_row(
            str(r["max_loras"]),
            str(r["max_cpu_loras"]),
            f"{r['output_tok_s']:.1f}",
            f"{r['ttft_ms_p50']:.1f} / {r['ttft_ms_p99']:.1f}",
            f"{100 * rec.delayed_at(int(r['max_loras'])):.2f}%",
        )
    console.print(measured)
    verdict, _ = confirm(rec, rows, slo_ttft_ms)
    console.print(verdict)
    console.print(f"run directory: {out} (cells.csv has one row per candidate and run)")


def _medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per max_loras: the median throughput and p99 TTFT over its runs."""
    import statistics

    out = []
    for ml in sorted({r["max_loras"] for r in runs}):
        mine = [r for r in runs if r["max_loras"] == ml]
        row = dict(mine[0])
        for key in ("output_tok_s", "ttft_ms_p50", "ttft_ms_p99"):
            row[key] = statistics.median(float(r[key]) for r in mine)
        out.append(row)
    return out
