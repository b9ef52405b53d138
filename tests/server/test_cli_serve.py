"""`lorascope serve` end to end: a subprocess binds 127.0.0.1, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def test_serve_command_serves_and_stops(tiny) -> None:
    model, adapters = tiny
    root = next(iter(adapters.values())).parent.parent  # mixed_adapters' root: all/ and attn/ hold the adapters
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from lorascope.cli import main; main()", "serve", "--model", str(model),
           "--adapters", str(root / "all"), "--port", str(port), "--served-model-name", "base", "--max-waiting", "4",
           "--api-key", "k", "--max-model-len", "128"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
        assert {m["id"] for m in models} == {"base", *(p.name for p in (root / "all").iterdir())}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.post(f"{url}/v1/completions", headers=headers, json={"model": "base", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean stop
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
