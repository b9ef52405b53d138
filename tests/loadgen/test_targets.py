"""Targets against a real vLLM-CPU: launched with the cell's knobs, adapters listed from
/v1/models, measured by the client with the full record schema, and stopped cleanly."""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
from pathlib import Path

import pytest

from lorascope.adapters.synthetic import make_adapters
from lorascope.loadgen.client import ClientRequest, Target, run_cell
from lorascope.loadgen.targets import CellKnobs, TargetError, adapters_of, vllm_server
from lorascope.results.records import records_frame
from lorascope.results.summary import summarize


@pytest.mark.vllm
def test_vllm_target_end_to_end(tmp_path: Path, model_dir, vllm_python: Path) -> None:
    mdir = model_dir("tiny")
    adapters = {p.name: p for p in make_adapters(tmp_path / "ad", str(mdir), 6, 8, ["q_proj", "v_proj"])}
    knobs = CellKnobs(max_loras=2, max_cpu_loras=6, max_lora_rank=8, max_num_seqs=8, max_model_len=256)
    server = vllm_server(f"{vllm_python} -m vllm.entrypoints.openai.api_server", str(mdir), adapters, knobs,
                         tmp_path / "vllm.log", served_name="tiny")
    with server:
        base, names = adapters_of(server.base_url)
        assert base == "tiny" and names == sorted(adapters)
        reqs = [ClientRequest(i, names[i % 6], names[i % 6], list(range(1, 17)), 8) for i in range(12)]
        records, overhead = asyncio.run(run_cell(Target(server.base_url), reqs, "vllm-cell", 0, concurrency=4))
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as r:
            metrics = r.read().decode()
    assert server.proc is not None and server.proc.poll() is not None, "the server was not stopped"
    s = summarize(records_frame(records))
    assert s["ok"] == 12 and s["output_tokens"] == 12 * 8 and s["token_count_mismatches"] == 0
    assert all(r.prompt_tokens == 16 for r in records)
    assert s["ttft_ms_p50"] > 0 and s["output_tok_s"] > 0 and "loop_lag_p99_ms" in overhead
    assert "vllm:lora_requests_info" in metrics


def test_a_server_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    from lorascope.loadgen.targets import ServerProcess, free_port

    bad = ServerProcess(["python3", "-c", "import sys; print('no such model'); sys.exit(3)"], free_port(),
                        tmp_path / "bad.log", startup_timeout_s=20)
    with pytest.raises(TargetError, match="no such model"):
        bad.__enter__()


def test_sglang_command_line_uses_its_lora_flags(tmp_path: Path) -> None:
    """SGLang cannot be installed here (no CPU build); its launch line is checked against its
    documented LoRA flags, and adapters are addressed as BASE:ADAPTER."""
    from lorascope.loadgen.targets import sglang_model_name, sglang_server

    adapters = {"b": tmp_path / "b", "a": tmp_path / "a"}
    knobs = CellKnobs(max_loras=4, max_cpu_loras=16, max_lora_rank=8, max_num_seqs=32, max_model_len=512)
    cmd = sglang_server("python -m sglang.launch_server", "/m", adapters, knobs, tmp_path / "log").cmd
    flags = dict(itertools.pairwise(cmd))
    assert cmd[:3] == ["python", "-m", "sglang.launch_server"] and flags["--model-path"] == "/m"
    assert flags["--max-loras-per-batch"] == "4" and flags["--max-loaded-loras"] == "16"
    assert flags["--max-lora-rank"] == "8" and flags["--max-running-requests"] == "32"
    assert "--enable-lora" in cmd and flags["--host"] == "127.0.0.1"
    paths = cmd[cmd.index("--lora-paths") + 1 :]
    assert paths == [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    assert sglang_model_name("base", "a") == "base:a" and sglang_model_name("base", None) == "base"
