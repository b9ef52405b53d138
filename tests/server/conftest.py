"""A real uvicorn server on 127.0.0.1 (a free port) in a background thread, over a real engine."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lorascope.config import EngineConfig
from lorascope.engine.async_engine import AsyncLLMEngine
from lorascope.server import build_app

SERVED = "tiny-base"


@dataclass
class LiveServer:
    url: str
    engine: AsyncLLMEngine
    api_key: str | None = None
    served: str = SERVED

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """{sample name: [(labels, value)]} from /metrics, parsed by prometheus_client's parser."""
        with self.client() as c:
            r = c.get("/metrics")
        assert r.status_code == 200, r.text
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
        return out

    def gauge(self, name: str) -> float:
        (_, value), = self.metrics()[name]
        return value

    def wait_idle(self, timeout_s: float = 30.0) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Metrics once no request is waiting or running (aborts reach the engine asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            busy = m["lorascope:num_requests_waiting"][0][1] + m["lorascope:num_requests_running"][0][1]
            if busy == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


@contextmanager
def live_server(model: Path, adapters: Any, *, max_waiting: int | None = None, api_key: str | None = None,
                allowed_adapter_root: Path | None = None, enable_runtime_lora: bool = False,
                **engine_args: Any) -> Iterator[LiveServer]:
    args = {"max_loras": 4, "max_cpu_loras": 8, "max_lora_rank": 16, "max_model_len": 256} | engine_args
    engine = AsyncLLMEngine(EngineConfig(model=str(model), **args), adapters, max_waiting=max_waiting)
    app = build_app(engine, SERVED, api_key, allowed_adapter_root, enable_runtime_lora)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", engine, api_key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def tiny(model_dir, mixed_adapters) -> tuple[Path, dict[str, Path]]:
    return model_dir("tiny"), mixed_adapters("tiny")


@pytest.fixture(scope="session")
def start_server():
    """start_server(model_dir, adapters, **options) -> a context manager yielding a LiveServer."""
    return live_server


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[LiveServer]:
    with live_server(*tiny) as s:
        yield s
