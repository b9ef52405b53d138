"""`lorascope verify`: drive an engine with every (prompt, model) request, all at once in mixed batches
under several max_loras settings and once one at a time, and judge each answer (verify.py; docs/verify.md).

cli.py registers the command. ValueError = bad input (exit 2); a failing finding exits 1.
Each setting gets a fresh server. Requests are greedy (temperature 0), exact length (`ignore_eos`,
`min_tokens`), with token-id prompts and `return_token_ids`, so nothing depends on tokenization.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
from rich.console import Console
from rich.table import Table

from lorascope.adapters.peft import list_adapter_dirs, read_peft_adapter
from lorascope.loadgen.targets import (
    CellKnobs,
    TargetError,
    adapters_of,
    embedded_server,
    sglang_model_name,
    sglang_server,
    vllm_server,
)
from lorascope.model.presets import PRESETS
from lorascope.model.weights import DTYPES, load_model, resolve_config, save_model
from lorascope.verify import (
    BASE,
    CACHE_DIR,
    CANDIDATES,
    DRIFT_TOL,
    Answer,
    Outcome,
    ambiguous_pairs,
    classify,
    make_prompts,
    references,
    summary_line,
    verdict,
)

ENGINES = ("embedded", "vllm", "sglang", "url")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
console = Console()


@dataclass(slots=True)
class VerifySpec:
    adapters_dir: Path
    engine: str = "embedded"
    model: str = "tiny"
    max_loras: list[int] = field(default_factory=list)  # empty: below, at and above the adapter count
    serial: bool = True  # also one request at a time
    prompts: int = 4
    tokens: int = 32
    prompt_len: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    drift_tol: float | None = None  # None: by dtype (verify.DRIFT_TOL)
    policy: str = "fair"
    seed: int = 0
    url: str | None = None
    vllm_cmd: str = "vllm serve"
    sglang_cmd: str = "python -m sglang.launch_server"
    use_cache: bool = True
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "url" and not self.url:
            raise ValueError(
                "--engine url needs --url http://HOST:PORT (a server that serves --adapters by their names)"
            )
        if min(self.prompts, self.tokens, self.prompt_len) < 1:
            raise ValueError(
                f"--prompts, --tokens and --prompt-len must be >= 1, got {self.prompts}, {self.tokens}, {self.prompt_len}"
            )
        if any(m < 1 for m in self.max_loras):
            raise ValueError(f"--max-loras values must be >= 1, got {self.max_loras}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.drift_tol is not None and self.drift_tol < 0:
            raise ValueError(f"--drift-tol must be >= 0, got {self.drift_tol}")
        if not Path(self.adapters_dir).is_dir():
            raise ValueError(
                f"--adapters {self.adapters_dir} is not a directory; make adapters with "
                f"`lorascope adapters make {self.adapters_dir} --model {self.model}`"
            )


@dataclass(slots=True)
class Setting:
    name: str
    max_loras: int | None  # None: the server's own (url)
    serial: bool


def plan_settings(spec: VerifySpec, n: int) -> list[Setting]:
    """max_loras below, at and above the adapter count (or as given), all at once; then one at a time."""
    if spec.engine == "url":
        out = [Setting("mixed", None, False)]
        return [*out, Setting("one-at-a-time", None, True)] if spec.serial else out
    values = sorted(set(spec.max_loras or [max(1, n // 2), n, 2 * n]))
    out = [Setting(f"max_loras={m}", m, False) for m in values]
    return [*out, Setting(f"one-at-a-time (max_loras={n})", n, True)] if spec.serial else out


def run_verify(spec: VerifySpec, out: Path, log: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    """The whole audit into `out/verify.json` (returned as a dict)."""
    adapters = list_adapter_dirs(Path(spec.adapters_dir))
    if not adapters:
        raise ValueError(
            f"no PEFT adapters under {spec.adapters_dir} (subdirectories with adapter_config.json); "
            f"make some with `lorascope adapters make {spec.adapters_dir} --model {spec.model}`"
        )
    cache = Path(spec.adapters_dir) / CACHE_DIR
    model_dir = _model_dir(spec.model, cache)
    cfg = resolve_config(str(model_dir))
    ranks = [read_peft_adapter(p, cfg, 1 << 20, name).rank for name, p in adapters.items()]
    prompts = make_prompts(
        spec.prompts * CANDIDATES,
        spec.prompt_len,
        cfg.vocab_size,
        {i for i in (cfg.bos_token_id, *cfg.eos_token_id) if i is not None},
        spec.seed,
    )
    log(
        f"references: HF transformers + PEFT, {spec.prompts} of {len(prompts)} prompts x {len(adapters) + 1} models, "
        f"{spec.tokens} tokens"
    )
    refs = references(
        model_dir,
        adapters,
        prompts,
        spec.tokens,
        spec.dtype,
        spec.device,
        cache if spec.use_cache else None,
        keep=spec.prompts,
    )
    decode = _decoder(model_dir)
    drift_tol = spec.drift_tol if spec.drift_tol is not None else DRIFT_TOL[spec.dtype]
    settings = plan_settings(spec, len(adapters))
    outcomes: list[Outcome] = []
    errors: dict[str, str] = {}
    for setting in settings:
        log(
            f"{setting.name}: {len(refs.models) * len(refs.prompts)} requests {'one at a time' if setting.serial else 'at once'}"
        )
        answers, error = _run_setting(spec, setting, model_dir, adapters, refs.prompts, refs.models, max(ranks), out)
        if error:
            errors[setting.name] = error
        for (k, m), answer in answers.items():
            outcomes.append(classify(refs, setting.name, k, m, answer, drift_tol, decode))
    status, counts = verdict(outcomes)
    result = {
        "verdict": status,
        "summary": summary_line(outcomes, len(settings)),
        "counts": counts,
        "engine": spec.engine,
        "engine_version": _engine_version(spec),
        "model": spec.model,
        "model_dir": str(model_dir),
        "adapters_dir": str(spec.adapters_dir),
        "adapters": sorted(adapters),
        "prompts": spec.prompts,
        "prompt_len": spec.prompt_len,
        "tokens": spec.tokens,
        "dtype": spec.dtype,
        "device": spec.device,
        "drift_tol": drift_tol,
        "reference": {"key": refs.key, "cached": refs.cached, "path": str(refs.path or "")},
        "ambiguous": ambiguous_pairs(refs),
        "settings": [
            {"name": s.name, "max_loras": s.max_loras, "serial": s.serial, "error": errors.get(s.name)}
            for s in settings
        ],
        "outcomes": [o.to_dict() for o in outcomes],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "verify.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / "verify.json")
    return result


def _model_dir(model: str, cache: Path) -> Path:
    """An HF directory for every engine and the reference: a preset is written once into the cache."""
    if Path(model).is_dir():
        resolve_config(model)  # a clear error when config.json is missing
        return Path(model)
    if model not in PRESETS:
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    path = cache / f"model-{model}"
    if not (path / "config.json").is_file():
        tmp = cache / f"model-{model}.tmp{os.getpid()}"
        save_model(load_model(model), tmp)
        with contextlib.suppress(OSError):  # another process finished it first
            os.replace(tmp, path)
    return path


def _decoder(model_dir: Path) -> Callable[[list[int]], str] | None:
    from lorascope.model.tokenizer import TextTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        return None
    cfg = resolve_config(str(model_dir))
    tok = TextTokenizer.from_dir(model_dir, cfg.bos_token_id, cfg.eos_token_id)
    return tok.decode


def _run_setting(
    spec: VerifySpec,
    setting: Setting,
    model_dir: Path,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    models: list[str],
    max_rank: int,
    out: Path,
) -> tuple[dict[tuple[int, str], Answer], str | None]:
    """A fresh server for the setting; every (prompt, model) answer, or errors for all when it fails."""
    keys = [(k, m) for k in range(len(prompts)) for m in models]  # interleaved: each batch mixes adapters
    try:
        with _server(spec, setting, model_dir, adapters, max_rank, len(keys), out) as url:
            if spec.engine == "sglang":  # it may not list adapters: name them as it expects
                names = {m: sglang_model_name("base", None if m == BASE else m) for m in models}
            else:
                base, served = adapters_of(url)
                if missing := sorted(set(adapters) - set(served)):
                    raise TargetError(
                        f"{url} does not serve adapters {', '.join(missing[:5])}: serve every "
                        f"adapter of {spec.adapters_dir} under its directory name"
                    )
                names = {m: base if m == BASE else m for m in models}
            bodies = [_body(names[m], prompts[k], spec.tokens) for k, m in keys]
            answers = asyncio.run(_ask_all(url, bodies, setting.serial, spec.timeout_s))
        return dict(zip(keys, answers, strict=True)), None
    except (TargetError, OSError, ValueError, KeyError, StopIteration) as e:
        msg = f"{setting.name}: the server failed: {str(e)[:2000]}"
        return {key: Answer(error=msg) for key in keys}, msg


@contextlib.contextmanager
def _server(
    spec: VerifySpec,
    setting: Setting,
    model_dir: Path,
    adapters: dict[str, Path],
    max_rank: int,
    requests: int,
    out: Path,
) -> Iterator[str]:
    if spec.engine == "url":
        yield str(spec.url).rstrip("/")
        return
    n = setting.max_loras or len(adapters)
    knobs = CellKnobs(
        max_loras=n,
        max_cpu_loras=max(n, len(adapters)),
        max_lora_rank=next(r for r in LORA_RANKS if r >= max_rank),
        max_num_seqs=max(requests, 1),
        max_model_len=max(128, spec.prompt_len + spec.tokens + 16),
        policy=spec.policy,
        dtype=spec.dtype,
        device=spec.device,
    )
    log = out / "logs" / f"verify-{setting.name.split()[0].replace('=', '')}{'-serial' if setting.serial else ''}.log"
    if spec.engine == "embedded":
        server = embedded_server(str(model_dir), Path(spec.adapters_dir), knobs, log)
    elif spec.engine == "vllm":
        server = vllm_server(spec.vllm_cmd, str(model_dir), adapters, knobs, log)
    else:
        server = sglang_server(spec.sglang_cmd, str(model_dir), adapters, knobs, log)
    with server:
        yield server.base_url


def _body(model: str, prompt: list[int], tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": False,
    }


async def _ask_all(url: str, bodies: list[dict[str, Any]], serial: bool, timeout_s: float) -> list[Answer]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        if serial:
            return [await _ask(session, url, b, timeout_s) for b in bodies]
        return list(await asyncio.gather(*(_ask(session, url, b, timeout_s) for b in bodies)))


async def _ask(session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout_s: float) -> Answer:
    """One non-streaming completion; never raises: failures become an Answer with `error`."""
    try:
        async with session.post(
            f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as r:
            text = await r.text()
            if r.status != 200:
                return Answer(error=f"HTTP {r.status}: {text[:300]}")
            choice = json.loads(text)["choices"][0]
            ids = choice.get("token_ids")
            return Answer(tokens=[int(t) for t in ids] if ids else None, text=choice.get("text"))
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as e:
        return Answer(error=f"{type(e).__name__}: {e}")


def _engine_version(spec: VerifySpec) -> str:
    if spec.engine == "url":
        return "unknown"
    from lorascope.bench import BenchSpec, engine_version

    return engine_version(BenchSpec(engine=spec.engine, vllm_cmd=spec.vllm_cmd, sglang_cmd=spec.sglang_cmd))


def result_table(result: dict[str, Any]) -> Table:
    """One row per model (the base first), one column per setting: what its answers were."""
    settings = [s["name"] for s in result["settings"]]
    table = Table(
        title=f"verify {result['engine']} {result['engine_version']}: {result['model']}, "
        f"{len(result['adapters'])} adapters, {result['prompts']} prompts x {result['tokens']} tokens"
    )
    table.add_column("model")
    for s in settings:
        table.add_column(s)
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in result["outcomes"]:
        by.setdefault((o["model"], o["setting"]), []).append(o)
    for m in [BASE, *result["adapters"]]:
        table.add_row(m, *[cell_text(by.get((m, s), [])) for s in settings])
    return table


def cell_text(outcomes: list[dict[str, Any]]) -> str:
    """e.g. "ok 4/4", "[red]3 contaminated -> a0000[/red], ok 1/4", "drift 1 (margin 0.002)"."""
    ok = sum(o["status"] == "pass" for o in outcomes)
    parts = []
    for status, word, color in (
        ("contaminated_base", "contaminated ->", "red"),
        ("wrong_adapter", "wrong adapter ->", "red"),
        ("wrong_output", "wrong output, closest", "red"),
        ("error", "error", "red"),
        ("drift", "drift", "yellow"),
    ):
        found = [o for o in outcomes if o["status"] == status]
        if not found:
            continue
        if status == "drift":
            text = f"drift {len(found)} (margin {min(o['margin'] for o in found):.2g})"
        elif status == "error":
            text = f"error {len(found)}"
        else:
            text = f"{len(found)} {word} {', '.join(sorted({'/'.join(o['got']) for o in found}))}"
        parts.append(f"[{color}]{text}[/{color}]")
    return ", ".join([*parts, f"ok {ok}/{len(outcomes)}"])


def verify(
    adapters: Annotated[Path, typer.Option(help="directory of PEFT adapters (one subdirectory each)")],
    engine: Annotated[str, typer.Option(help="embedded | vllm | sglang | url")] = "embedded",
    model: Annotated[
        str, typer.Option(help="preset name or Hugging Face directory (the base of the adapters)")
    ] = "tiny",
    max_loras: Annotated[
        str | None, typer.Option(help="comma list of settings (default: N/2, N, 2N for N adapters)")
    ] = None,
    serial: Annotated[bool, typer.Option(help="also send every request one at a time")] = True,
    prompts: Annotated[int, typer.Option(help="prompts per model (K): K x (adapters + 1) requests")] = 4,
    tokens: Annotated[int, typer.Option(help="greedy tokens per request (T)")] = 32,
    prompt_len: Annotated[int, typer.Option(help="token ids per prompt")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 (engine and reference)")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda (engine and reference)")] = "cpu",
    drift_tol: Annotated[
        float | None, typer.Option(help="drift: margin <= this x logit std (default by dtype)")
    ] = None,
    policy: Annotated[str, typer.Option(help="embedded engine: fair | vllm")] = "fair",
    url: Annotated[str | None, typer.Option(help="with --engine url: the server")] = None,
    vllm_cmd: Annotated[str, typer.Option(help="how to start vLLM")] = "vllm serve",
    sglang_cmd: Annotated[str, typer.Option(help="how to start SGLang")] = "python -m sglang.launch_server",
    cache: Annotated[bool, typer.Option(help="reuse references cached in ADAPTERS/.lorascope-verify")] = True,
    seed: int = 0,
    out: Annotated[
        Path | None, typer.Option(help="directory for verify.json and logs (default runs/verify-TIME)")
    ] = None,
) -> None:
    """Check that an engine applies the right adapter to every request in mixed batches (exit 1 on a finding)."""
    try:
        levels = [int(v) for v in max_loras.split(",")] if max_loras else []
    except ValueError:
        raise ValueError(f"--max-loras must be a comma list of integers (e.g. 3,6), got {max_loras!r}") from None
    spec = VerifySpec(
        adapters_dir=adapters,
        engine=engine,
        model=model,
        max_loras=levels,
        serial=serial,
        prompts=prompts,
        tokens=tokens,
        prompt_len=prompt_len,
        dtype=dtype,
        device=device,
        drift_tol=drift_tol,
        policy=policy,
        seed=seed,
        url=url,
        vllm_cmd=vllm_cmd,
        sglang_cmd=sglang_cmd,
        use_cache=cache,
    )
    out = out or Path("runs") / f"verify-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_verify(spec, out, lambda s: console.print(f"[dim]{s}[/dim]"))
    console.print(result_table(result))
    for a in result["ambiguous"]:
        console.print(
            f"[yellow]ambiguous:[/yellow] prompt {a['prompt']}: references of {', '.join(a['models'])} coincide"
        )
    for s in result["settings"]:
        if s["error"]:
            console.print(s["error"][:500], style="red", markup=False)
    color = "green" if result["verdict"] == "pass" else "red"
    console.print(f"[{color}]{result['summary']}[/{color}]")
    console.print(f"verify.json: {out / 'verify.json'}")
    if result["verdict"] != "pass":
        raise typer.Exit(1)
