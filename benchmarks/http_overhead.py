"""What HTTP costs: one cell (tiny, 8 adapters, 64 requests at concurrency 8, 32 prompt + 32 output
tokens, greedy, ignore_eos) through the AsyncLLMEngine directly and through `lorascope serve`
(streaming /v1/completions, httpx client, server in its own process). Prints tok/s and the ratio.

    python benchmarks/http_overhead.py [--out benchmarks/out/http_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from lorascope import SamplingParams
from lorascope.adapters.synthetic import make_adapters
from lorascope.config import EngineConfig
from lorascope.engine.async_engine import AsyncLLMEngine
from lorascope.model.weights import load_model, save_model

CELL = {"adapters": 8, "requests": 64, "warmup": 8, "concurrency": 8, "prompt_len": 32, "output_len": 32,
        "max_loras": 8}


def workload(names: list[str], n: int, seed: int = 0) -> list[tuple[list[int], str]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, 255) for _ in range(CELL["prompt_len"])], rng.choice(names)) for _ in range(n)]


async def closed_loop(send, work: list[tuple[list[int], str]]) -> dict[str, float]:
    """`concurrency` workers; the first `warmup` requests are sent and finished before the clock starts."""
    warm, measured = work[: CELL["warmup"]], work[CELL["warmup"] :]
    await asyncio.gather(*(send(p, a) for p, a in warm))
    queue = list(measured)
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            prompt, adapter = queue.pop()
            n = await send(prompt, adapter)  # not `tokens += await ...`: that reads `tokens` before awaiting
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CELL["concurrency"])))
    elapsed = time.perf_counter() - start
    expected = len(measured) * CELL["output_len"]
    if tokens != expected:
        raise RuntimeError(f"counted {tokens} output tokens, expected {expected}")
    return {"tok_s": tokens / elapsed, "elapsed_s": elapsed, "tokens": tokens}


async def direct(model: Path, adapters: Path, work: list[tuple[list[int], str]]) -> dict[str, float]:
    engine = AsyncLLMEngine(EngineConfig(model=str(model), max_loras=CELL["max_loras"]), adapters)
    engine.start()
    params = SamplingParams(max_tokens=CELL["output_len"], temperature=0.0, ignore_eos=True)

    async def send(prompt: list[int], adapter: str) -> int:
        return sum([len(d.token_ids) async for d in engine.generate(prompt, params, adapter)])

    try:
        return await closed_loop(send, work)
    finally:
        engine.shutdown()


async def over_http(url: str, work: list[tuple[list[int], str]]) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:

        async def send(prompt: list[int], adapter: str) -> int:
            body = {"model": adapter, "prompt": prompt, "max_tokens": CELL["output_len"], "temperature": 0,
                    "ignore_eos": True, "stream": True}
            tokens = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[6:])["choices"]
                        tokens += sum(len(c["token_ids"]) for c in choices)
            return tokens

        return await closed_loop(send, work)


def start_server(model: Path, adapters: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from lorascope.cli import main; main()", "serve", "--model", str(model),
           "--adapters", str(adapters), "--max-loras", str(CELL["max_loras"]), "--port", str(port)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not come up (exit code {proc.poll()})")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "http_overhead.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = Path(tmp) / "model", Path(tmp) / "adapters"
        save_model(load_model("tiny"), model)
        make_adapters(adapters, str(model), CELL["adapters"], 16, ["q_proj", "v_proj"], seed=0)
        names = sorted(p.name for p in adapters.iterdir())
        work = workload(names, CELL["warmup"] + CELL["requests"])
        engine_result = asyncio.run(direct(model, adapters, work))
        proc, url = start_server(model, adapters)
        try:
            http_result = asyncio.run(over_http(url, work))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    ratio = http_result["tok_s"] / engine_result["tok_s"]
    print(f"direct AsyncLLMEngine: {engine_result['tok_s']:.0f} tok/s ({engine_result['elapsed_s']:.2f} s)")
    print(f"HTTP streaming:        {http_result['tok_s']:.0f} tok/s ({http_result['elapsed_s']:.2f} s)")
    print(f"HTTP / direct:         {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cell": CELL, "direct": engine_result, "http": http_result, "ratio_http_over_direct": ratio,
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
