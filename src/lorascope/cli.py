"""The `lorascope` command line (typer). Each command is a thin shell over the library."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Serve and measure many LoRA adapters on one base model.")
model_app = typer.Typer(no_args_is_help=True, help="Base models: presets and Hugging Face directories.")
adapters_app = typer.Typer(no_args_is_help=True, help="PEFT LoRA adapters.")
app.add_typer(model_app, name="model")
app.add_typer(adapters_app, name="adapters")
console = Console()


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors (ValueError and friends) print one line and exit 2, without a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None

    return wrapper


@model_app.command("save")
@_clean_errors
def model_save(
    preset: Annotated[str, typer.Argument(help="tiny, tiny-qwen2, tiny-mistral or llama-3.1-8b")],
    out: Annotated[Path, typer.Argument(help="directory to write (config.json, safetensors, tokenizer)")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    device: Annotated[str, typer.Option(help="where to build the weights")] = "cpu",
    seed: int = 0,
) -> None:
    """Write a preset as a Hugging Face directory that transformers, PEFT and vLLM load."""
    from lorascope.model.presets import PRESETS
    from lorascope.model.weights import load_model, save_model

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    start = time.perf_counter()
    save_model(load_model(preset, dtype, device, seed=seed), out)
    console.print(f"wrote {preset} to {out} in {time.perf_counter() - start:.1f} s")


@adapters_app.command("make")
@_clean_errors
def adapters_make(
    out: Annotated[Path, typer.Argument(help="directory to hold the adapters (one subdirectory each)")],
    model: Annotated[str, typer.Option(help="preset name or Hugging Face directory")] = "tiny",
    count: Annotated[int, typer.Option(help="how many adapters")] = 8,
    rank: Annotated[str, typer.Option(help="rank, or a comma list cycled over adapters (e.g. 8,16)")] = "16",
    targets: Annotated[str, typer.Option(help="comma-separated target modules")] = "q_proj,v_proj",
    alpha: Annotated[float | None, typer.Option(help="lora_alpha (default 2 x rank)")] = None,
    seed: int = 0,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 (bf16 halves the files)")] = "float32",
) -> None:
    """Write COUNT random (non-zero) adapters in PEFT's exact format."""
    from lorascope.adapters.synthetic import make_adapters
    from lorascope.model.weights import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ranks = [int(r) for r in rank.split(",")]
    start = time.perf_counter()
    paths = make_adapters(out, model, count, ranks if len(ranks) > 1 else ranks[0], targets.split(","), alpha, seed,
                          DTYPES[dtype])
    console.print(f"wrote {len(paths)} adapters to {out} in {time.perf_counter() - start:.2f} s")


@app.command()
@_clean_errors
def generate(
    model: Annotated[str, typer.Option(help="preset name or Hugging Face directory")] = "tiny",
    adapters: Annotated[str | None, typer.Option(help="directory of PEFT adapters, or synthetic:COUNT[:RANK[:LATENCY_MS[:SEED]]]")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="prompt text (repeatable)")] = None,
    num_prompts: Annotated[int, typer.Option(help="requests to send, cycling prompts and adapters")] = 16,
    max_tokens: int = 32,
    temperature: float = 0.0,
    max_loras: int = 4,
    max_cpu_loras: int | None = None,
    max_lora_rank: int = 16,
    policy: str = "fair",
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """Generate with the embedded engine: a mixed batch over every adapter plus the base model."""
    from lorascope import LLM, SamplingParams

    llm = LLM(model, adapters, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
              policy=policy, device=device, dtype=dtype)
    names: list[str | None] = [None, *llm.engine.source.names()]
    texts = prompt or ["The quick brown fox", "Multi-LoRA serving is", "Once upon a time"]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True, seed=0)
    start = time.perf_counter()
    outs = llm.generate([texts[i % len(texts)] for i in range(num_prompts)], params,
                        [names[i % len(names)] for i in range(num_prompts)])
    elapsed = time.perf_counter() - start
    table = Table(title=f"{model}: {num_prompts} requests over {len(names) - 1} adapters + base")
    for col in ("adapter", "prompt", "first generated token ids", "text (random weights: bytes, not words)"):
        table.add_column(col, overflow="fold")
    for o in outs[:12]:
        prompt_text = llm.engine.tokenizer.decode(o.prompt_ids) if llm.engine.tokenizer else ""
        table.add_row(o.adapter or "(base)", prompt_text, " ".join(map(str, o.token_ids[:8])), repr(o.text)[:40])
    console.print(table)
    tokens = sum(len(o.token_ids) for o in outs)
    console.print(f"{tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.0f} tok/s; adapter tiers: {llm.engine.cache.stats()}")
    llm.close()


@app.command()
@_clean_errors
def serve(
    model: Annotated[str, typer.Option(help="preset name or Hugging Face directory")] = "tiny",
    adapters: Annotated[str | None, typer.Option(help="directory of PEFT adapters (one subdirectory each), or "
                     "synthetic:COUNT[:RANK[:LATENCY_MS[:SEED]]] (weights generated on load; capacity planning)")] = None,
    max_loras: int = 8,
    max_cpu_loras: int | None = None,
    max_lora_rank: int = 16,
    max_num_seqs: int = 64,
    policy: Annotated[str, typer.Option(help="fair | vllm")] = "fair",
    host: Annotated[str, typer.Option(help="address to bind (loopback unless told otherwise)")] = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, typer.Option(help="require 'Authorization: Bearer KEY' on every route but /health")] = None,
    allowed_adapter_root: Annotated[Path | None, typer.Option(help="runtime-loaded adapters must lie under it")] = None,
    enable_runtime_lora: Annotated[bool, typer.Option(help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter")] = False,
    max_waiting: Annotated[int | None, typer.Option(help="answer 429 when more requests wait than this")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the base model's name in the API (default: --model)")] = None,
    dtype: str = "float32",
    device: str = "cpu",
    max_model_len: int | None = None,
) -> None:
    """Serve the embedded engine over an OpenAI-compatible HTTP API (plus /metrics)."""
    import uvicorn

    from lorascope.config import EngineConfig
    from lorascope.engine.async_engine import AsyncLLMEngine
    from lorascope.server import build_app

    cfg = EngineConfig(model=model, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
                       max_num_seqs=max_num_seqs, policy=policy, dtype=dtype, device=device, max_model_len=max_model_len)
    engine = AsyncLLMEngine(cfg, adapters, max_waiting=max_waiting)
    name = served_model_name or model
    app_ = build_app(engine, name, api_key, allowed_adapter_root, enable_runtime_lora)
    console.print(f"serving {name} with {len(engine.adapter_names())} adapters on http://{host}:{port}")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
@_clean_errors
def bench(
    engine: Annotated[str, typer.Option(help="embedded | vllm | sglang | url")] = "embedded",
    model: Annotated[str, typer.Option(help="preset or Hugging Face directory")] = "tiny",
    adapters: Annotated[int, typer.Option(help="adapters to make and serve (N)")] = 20,
    adapters_dir: Annotated[Path | None, typer.Option(help="serve these PEFT adapters instead of making N")] = None,
    rank: int = 16,
    targets: str = "q_proj,v_proj",
    traffic: Annotated[str, typer.Option(help="uniform | zipf:S | power:A | hotset:F:P | drift:LAW:PERIOD")] = "uniform",
    concurrency: Annotated[int | None, typer.Option(help="closed loop: requests in flight")] = None,
    rate: Annotated[float | None, typer.Option(help="open loop: requests per second")] = None,
    arrival: Annotated[str, typer.Option(help="poisson | gamma:CV | constant (with --rate)")] = "poisson",
    requests: int = 100,
    warmup: int = 8,
    warmup_mode: Annotated[str, typer.Option(help="all (touch every adapter first) | workload | auto (all when they fit the host tier)")] = "all",
    input_len: Annotated[str, typer.Option(help="L | uniform:LO:HI | normal:M:S | lognormal:M:S")] = "128",
    output_len: str = "128",
    max_loras: int = 8,
    max_cpu_loras: int | None = None,
    max_lora_rank: int = 16,
    max_num_seqs: int = 64,
    max_model_len: int = 2048,
    policy: Annotated[str, typer.Option(help="embedded engine: fair | vllm")] = "fair",
    dtype: str = "float32",
    device: str = "cpu",
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    url: Annotated[str | None, typer.Option(help="with --engine url: the server")] = None,
    vllm_cmd: Annotated[str, typer.Option(help="how to start vLLM")] = "vllm serve",
    sglang_cmd: Annotated[str, typer.Option(help="how to start SGLang")] = "python -m sglang.launch_server",
    seed: int = 0,
    out: Annotated[Path, typer.Option(help="run directory to write")] = Path("runs/bench"),
) -> None:
    """Measure one cell: a named traffic shape against an engine; every request recorded."""
    from lorascope.bench import BenchSpec, run_bench
    from lorascope.loadgen.targets import CellKnobs

    if concurrency is None and rate is None:
        concurrency = 8
    knobs = CellKnobs(max_loras, max_cpu_loras, max_lora_rank, max_num_seqs, max_model_len, policy, dtype, device)
    spec = BenchSpec(engine=engine, model=model, adapters_dir=adapters_dir, num_adapters=adapters, rank=rank,
                     targets=targets, traffic=traffic, concurrency=concurrency, rate=rate, arrival=arrival,
                     requests=requests, warmup=warmup, warmup_mode=warmup_mode, input_len=input_len,
                     output_len=output_len, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, seed=seed, url=url, vllm_cmd=vllm_cmd,
                     sglang_cmd=sglang_cmd, knobs=knobs)
    row = run_bench(spec, out)
    table = Table(title=f"{engine} · {traffic} over {row['adapters']} adapters · "
                        f"{'c=' + str(concurrency) if concurrency else f'{rate}/s {arrival}'} · max_loras {max_loras}")
    for col in ("ok / errors", "out tok/s", "TTFT p50 / p99 ms", "TPOT p50 ms", "ITL p50 ms", "distinct predicted",
                "adapters for 50% / 90%", "client lag p99 ms"):
        table.add_column(col)
    table.add_row(f"{row['ok']} / {row['errors'] + row['refused'] + row['timeouts']}", f"{row['output_tok_s']:.1f}",
                  f"{row['ttft_ms_p50']:.1f} / {row['ttft_ms_p99']:.1f}", f"{row['tpot_ms_p50']:.2f}",
                  f"{row['itl_ms_p50']:.2f}", f"{row['predicted_distinct'] or float('nan'):.1f}",
                  f"{row['adapters_for_50pct']} / {row['adapters_for_90pct']}", f"{row['loop_lag_p99_ms']:.1f}")
    console.print(table)
    console.print(f"run directory: {out} (manifest.json, requests.parquet, cells.csv, server_metrics.parquet)")


@app.command()
@_clean_errors
def run(
    preset: Annotated[str | None, typer.Option(help="quick | seed | fair-vs-vllm (default: quick without a GPU, seed with one)")] = None,
    spec: Annotated[Path | None, typer.Option(help="an experiment spec (TOML) instead of a preset")] = None,
    engine: Annotated[str | None, typer.Option(help="embedded | vllm | sglang | url: replaces the spec's engine")] = None,
    model: Annotated[str | None, typer.Option(help="preset name or Hugging Face directory (default: the spec's)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: the spec's; auto = cuda when present)")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory to create (default runs/PRESET-TIME)")] = None,
    resume: Annotated[Path | None, typer.Option(help="finish the run in this directory (its spec; finished cells kept)")] = None,
    vllm_cmd: Annotated[str | None, typer.Option(help="how to start vLLM (e.g. '.venv-vllm/bin/vllm serve')")] = None,
    url: Annotated[str | None, typer.Option(help="with --engine url: the server")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a run-wide spec key: KEY=VALUE (repeatable), e.g. requests=64")] = None,
    show_spec: Annotated[bool, typer.Option(help="print the spec (TOML) and its cells, run nothing")] = False,
    report: Annotated[bool, typer.Option(help="draw figures and report.html at the end")] = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    verify: Annotated[bool, typer.Option("--verify", help="first run `lorascope verify` on the run's engine: "
                                         "a correctness stamp on the report (exit 1 when it fails)")] = False,
) -> None:
    """The main job: every cell of a spec (fresh server each), recorded per request; then the report."""
    import sys

    from lorascope.experiment import ExperimentSpec, SpecError, load_preset, preset_path
    from lorascope.sweep import resume_spec, run_experiment, start_run

    if resume is not None:
        given = {"--preset": preset, "--spec": spec, "--engine": engine, "--model": model, "--device": device,
                 "--out": out, "--vllm-cmd": vllm_cmd, "--url": url, "--set": set_}
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise SpecError(f"--resume continues the run with its recorded spec; drop {', '.join(clash)}")
        plan = resume_spec(resume)
        run_dir = resume
    else:
        if preset is not None and spec is not None:
            raise SpecError("give --preset or --spec, not both")
        if spec is None and preset is None:
            import torch

            preset = "seed" if torch.cuda.is_available() else "quick"
        plan = ExperimentSpec.from_toml(spec) if spec is not None else load_preset(preset or "quick")
        plan = plan.with_overrides(engine=engine, model=model, device=device, vllm_cmd=vllm_cmd, url=url, sets=set_)
        if show_spec:
            if spec is None:
                console.print(preset_path(preset or "quick").read_text(), markup=False, highlight=False)
            runs = plan.runs()
            console.print(f"{len(plan.cells())} cells, {len(runs)} cell runs:")
            for cell in plan.cells():
                console.print(f"  {cell.cell_id}  x{cell.repetitions}", markup=False, highlight=False)
            return
        run_dir = out or Path("runs") / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        start_run(plan, run_dir, sys.argv)
        console.print(f"run directory: {run_dir} ({len(plan.runs())} cell runs; resume with `lorascope run --resume {run_dir}`)")
    result = run_experiment(run_dir, progress=progress, report=report, console=console, verify=verify)
    _print_run(run_dir)
    console.print(f"measured {result.ran} cell runs ({result.skipped} were already finished) in {run_dir}")
    if result.report:
        console.print(f"report: {result.report}")
    if result.verify is not None and result.verify != "pass":
        console.print(f"[red]verify: {result.verify}[/red] (see {run_dir / 'verify.json'} and the stamp on report.html)")
    if result.failed:
        console.print(f"[red]{len(result.failed)} cell runs failed[/red] (see {run_dir / 'failures'}; "
                      f"`lorascope run --resume {run_dir}` retries them):")
        for line in result.failed:
            console.print(f"  {line}", markup=False)
    if result.failed or (result.verify is not None and result.verify != "pass"):
        raise typer.Exit(1)


def _print_run(run_dir: Path) -> None:
    import pandas as pd

    path = run_dir / "cells.csv"
    if not path.exists() or path.stat().st_size == 0:
        return
    cells = pd.read_csv(path)
    if cells.empty:
        return
    table = Table(title=f"{run_dir}: {len(cells)} cell runs")
    for col in ("sweep", "N", "load", "traffic", "max_loras", "policy", "rep", "tok/s", "TTFT p50/p99 ms",
                "adapters/step pred/meas", "errors"):
        table.add_column(col)
    for r in cells.itertuples():
        load = f"c={r.concurrency:.0f}" if pd.notna(r.concurrency) else f"{r.rate:g}/s"
        table.add_row(str(r.sweep), str(r.adapters), load, str(r.traffic), str(r.max_loras), str(r.policy),
                      str(r.repetition), f"{r.output_tok_s:.0f}", f"{r.ttft_ms_p50:.0f} / {r.ttft_ms_p99:.0f}",
                      f"{r.predicted_distinct:.1f} / {r.active_adapters_mean:.1f}", str(r.errors + r.refused + r.timeouts))
    console.print(table)


@app.command()
@_clean_errors
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory (from run or bench)")]) -> None:
    """Rebuild the figures and report.html of a run directory from its records (nothing is re-run)."""
    from lorascope.analysis.report import build_report

    if not (run_dir / "cells.csv").exists():
        raise FileNotFoundError(f"{run_dir} has no cells.csv: not a run directory, or no cell has finished yet")
    path = build_report(run_dir)
    console.print(f"report: {path} (figures in {run_dir / 'figures'})")


from lorascope.tunecmd import tune as _tune  # noqa: E402  (a thin command; its module imports lazily)

app.command("tune")(_clean_errors(_tune))

from lorascope.verifycmd import verify as _verify  # noqa: E402

app.command("verify")(_clean_errors(_verify))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
