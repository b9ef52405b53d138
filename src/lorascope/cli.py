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
    adapters: Annotated[Path | None, typer.Option(help="directory of PEFT adapters")] = None,
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
    adapters: Annotated[Path | None, typer.Option(help="directory of PEFT adapters (one subdirectory each)")] = None,
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
    warmup_all_adapters: Annotated[bool, typer.Option(help="touch every adapter once before measuring")] = True,
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
                     requests=requests, warmup=warmup, warmup_all_adapters=warmup_all_adapters, input_len=input_len,
                     output_len=output_len, slo_ttft_ms=slo_ttft_ms, seed=seed, url=url, vllm_cmd=vllm_cmd,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
