"""Targets: the engines a cell runs against. Each launches (or finds) an OpenAI-compatible server,
waits for its health, lists its adapters, and stops it cleanly.

- `embedded`: `lorascope serve` with the cell's knobs (a fresh server per cell).
- `vllm`: `vllm serve` (or `python -m vllm.entrypoints.openai.api_server` through `--vllm-cmd`)
  with `--enable-lora --max-loras --max-cpu-loras --max-lora-rank --max-num-seqs` and the
  adapters as `--lora-modules`.
- `url`: an already running server; its adapters are read from `/v1/models`.

Servers run in their own process group and are stopped with SIGTERM (then SIGKILL), so a cell
never leaves a server behind.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class TargetError(RuntimeError):
    """A server that would not start or answer; the message carries the tail of its log."""


@dataclass(slots=True)
class CellKnobs:
    max_loras: int = 8
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_num_seqs: int = 64
    max_model_len: int = 2048
    policy: str = "fair"  # the embedded engine only
    dtype: str = "float32"
    device: str = "cpu"
    extra_args: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def list_models(base_url: str, api_key: str | None = None, timeout_s: float = 30) -> list[dict[str, object]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/v1/models", headers=headers), timeout=timeout_s) as r:
        return list(json.loads(r.read())["data"])


def adapters_of(base_url: str, api_key: str | None = None) -> tuple[str, list[str]]:
    """(base model name, adapter names) as the server lists them: adapters have the base as parent."""
    models = list_models(base_url, api_key)
    base = next(str(m["id"]) for m in models if not m.get("parent"))
    return base, sorted(str(m["id"]) for m in models if m.get("parent"))


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGKILL it when the process that started it dies, so a
    runner killed with kill -9 leaves no server behind. Elsewhere a no-op."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class ServerProcess:
    """A server started by a command line; `with` starts it and waits for /health."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 240.0):
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.base_url}/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    why = "exited" if self.proc.returncode is not None else f"no /health in {self.startup_timeout_s:.0f} s"
                    raise TargetError(f"server {why}: {shlex.join(self.cmd)}\n{self.log_tail()}") from None
                time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def embedded_server(model: str, adapters_dir: Path, knobs: CellKnobs, log_path: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "lorascope.cli", "serve", "--model", model, "--adapters", str(adapters_dir),
           "--port", str(port), "--max-loras", str(knobs.max_loras), "--max-lora-rank", str(knobs.max_lora_rank),
           "--max-num-seqs", str(knobs.max_num_seqs), "--policy", knobs.policy, "--dtype", knobs.dtype,
           "--device", knobs.device, "--max-model-len", str(knobs.max_model_len), *knobs.extra_args]
    if knobs.max_cpu_loras is not None:
        cmd += ["--max-cpu-loras", str(knobs.max_cpu_loras)]
    return ServerProcess(cmd, port, log_path)


def vllm_server(vllm_cmd: str, model: str, adapters: dict[str, Path], knobs: CellKnobs, log_path: Path,
                served_name: str = "base") -> ServerProcess:
    """`vllm_cmd`: e.g. "vllm serve" or ".venv-vllm/bin/python -m vllm.entrypoints.openai.api_server"."""
    port = free_port()
    cmd = [*shlex.split(vllm_cmd)]
    cmd += [model] if cmd[-1] == "serve" else ["--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name, "--dtype", knobs.dtype,
            "--max-model-len", str(knobs.max_model_len), "--enable-lora", "--max-loras", str(knobs.max_loras),
            "--max-lora-rank", str(knobs.max_lora_rank), "--max-num-seqs", str(knobs.max_num_seqs),
            "--max-cpu-loras", str(knobs.max_cpu_loras or knobs.max_loras), *knobs.extra_args]
    if adapters:
        cmd += ["--lora-modules", *[f"{name}={path}" for name, path in sorted(adapters.items())]]
    env = {"HF_HUB_OFFLINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if knobs.device == "cpu":
        env |= {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return ServerProcess(cmd, port, log_path, env)


def sglang_server(sglang_cmd: str, model: str, adapters: dict[str, Path], knobs: CellKnobs, log_path: Path,
                  served_name: str = "base") -> ServerProcess:
    """SGLang with its LoRA flags (docs.sglang.io "LoRA Serving"): `--max-loras-per-batch` is its
    max_loras (it counts the base model as one), `--max-loaded-loras` the host tier. Requests
    name an adapter as "BASE:ADAPTER" (`sglang_model_name`). Not exercised here: SGLang has no
    CPU build installable on this project's machines."""
    port = free_port()
    cmd = [*shlex.split(sglang_cmd), "--model-path", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", served_name, "--dtype", knobs.dtype, "--context-length", str(knobs.max_model_len),
           "--max-running-requests", str(knobs.max_num_seqs), "--enable-metrics", *knobs.extra_args]
    if adapters:
        cmd += ["--enable-lora", "--max-loras-per-batch", str(knobs.max_loras), "--max-lora-rank", str(knobs.max_lora_rank),
                "--max-loaded-loras", str(knobs.max_cpu_loras or knobs.max_loras),
                "--lora-paths", *[f"{name}={path}" for name, path in sorted(adapters.items())]]
    return ServerProcess(cmd, port, log_path, {"HF_HUB_OFFLINE": "1"})


def sglang_model_name(base: str, adapter: str | None) -> str:
    """SGLang's OpenAI API selects an adapter with the model name "BASE:ADAPTER"."""
    return base if adapter is None else f"{base}:{adapter}"
