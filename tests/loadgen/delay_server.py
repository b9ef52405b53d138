"""A real HTTP server on 127.0.0.1 that streams OpenAI-style completions with known, injected
delays: the first token after `ttft_s`, each next chunk after `itl_s`, `tokens_per_chunk` tokens a
chunk (with token_ids), usage in the last chunk. Models named "busy" answer 429."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web


def make_app(ttft_s: float, itl_s: float, tokens_per_chunk: int = 1) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        start = time.monotonic()  # delays are deadlines from here, so sleep overshoot never accumulates
        body = await request.json()
        if body["model"] == "busy":
            return web.json_response({"error": {"message": "busy"}}, status=429, headers={"Retry-After": "1"})
        n = int(body["max_tokens"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = 0
        while sent < n:
            k = 1 if sent == 0 else min(tokens_per_chunk, n - sent)
            # token j (0-based) is due at start + ttft + j * itl; a chunk goes when its last token is due
            await asyncio.sleep(max(0.0, start + ttft_s + (sent + k - 1) * itl_s - time.monotonic()))
            chunk = {"choices": [{"index": 0, "text": "x" * k, "token_ids": list(range(k)), "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            sent += k
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


@contextmanager
def serve(ttft_s: float, itl_s: float, tokens_per_chunk: int = 1) -> Iterator[str]:
    """Run the server in its own process (no GIL shared with the client being measured)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, str(port), str(ttft_s), str(itl_s), str(tokens_per_chunk)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the delay server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    port, ttft, itl, k = sys.argv[1:5]
    web.run_app(make_app(float(ttft), float(itl), int(k)), host="127.0.0.1", port=int(port), print=None)
