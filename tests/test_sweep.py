"""`lorascope run`: the sweep driver end to end on the embedded engine, resumable after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lorascope.experiment import ExperimentSpec, SpecError
from lorascope.results.records import finished_cells
from lorascope.sweep import run_experiment, start_run

SPEC = """
name = "resume-test"
model = "tiny"
input_len = "16"
output_len = "16"
requests = 48
warmup = 2
[[sweep]]
name = "a"
adapters = [4, 12]
concurrency = 4
traffic = "zipf:1.5"
max_loras = [2, 4]
policy = "vllm"
"""




def _servers_of(run_dir: Path) -> list[int]:
    """PIDs of live processes whose command line names this run directory (its servers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline and "serve" in cmdline:
            pids.append(int(proc.name))
    return pids


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (run_dir / "requests.parquet").glob("*.parquet")}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find leftover servers")
def test_kill_9_then_resume_gives_the_same_cells_none_redone(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(SPEC)
    whole, broken = tmp_path / "whole", tmp_path / "broken"

    done = subprocess.run([sys.executable, "-m", "lorascope.cli", "run", "--spec", str(spec_path), "--out", str(whole),
                           "--no-report", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    log = tmp_path / "broken.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lorascope.cli", "run", "--spec", str(spec_path), "--out",
                                 str(broken), "--no-report", "--no-progress"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while len(finished_cells(broken)) < 2:  # kill it after two cells, while the third is being measured
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no cell finished in 300 s"
        time.sleep(0.1)
    while sum("serving" in p.read_text() for p in (broken / "logs").glob("*.log")) < 3:  # the third server is up
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    time.sleep(0.2)  # its requests are in flight (a cell measures 48 requests: about 1-2 s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(finished_cells(broken)) < 4, "the run was not killed mid-sweep"
    before = _files(broken)
    time.sleep(1.0)
    assert _servers_of(broken) == [], "a server outlived its killed runner"

    resumed = subprocess.run([sys.executable, "-m", "lorascope.cli", "run", "--resume", str(broken), "--no-report",
                              "--no-progress"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already finished" in resumed.stdout

    assert finished_cells(broken) == finished_cells(whole) and len(finished_cells(whole)) == 4
    after = _files(broken)
    assert {k: after[k] for k in before} == before, "a cell finished before the kill was redone"
    cells = pd.read_csv(broken / "cells.csv")
    assert len(cells) == 4 and not cells.duplicated(["cell_id", "repetition"]).any()
    assert set(cells["cell_id"]) == set(pd.read_csv(whole / "cells.csv")["cell_id"])
    records = pd.read_parquet(broken / "requests.parquet")
    measured = records[~records["warmup"]]
    assert measured.groupby(["cell_id", "repetition"]).size().tolist() == [48] * 4  # no duplicated requests
    assert (cells["ok"] == 48).all()


def test_a_run_directory_is_never_overwritten(tmp_path: Path) -> None:
    spec = ExperimentSpec.from_dict({"name": "x", "model": "tiny", "sweep": [
        {"name": "a", "adapters": 1, "concurrency": 1, "traffic": "uniform", "max_loras": 1}]})
    start_run(spec, tmp_path / "run", ["test"])
    with pytest.raises(SpecError, match="--resume"):
        start_run(spec, tmp_path / "run", ["test"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(SpecError, match="not empty"):
        start_run(spec, tmp_path / "other", ["test"])
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """vLLM that cannot start (a command that exits at once): every cell fails, each is written to
    failures/ with the server's output, nothing is marked finished, and the run can be resumed."""
    spec = ExperimentSpec.from_dict({"name": "x", "model": "tiny", "engine": "vllm", "vllm_cmd": f"{sys.executable} -c 'import sys; sys.exit(3)'",
                                     "requests": 2, "warmup": 0, "sweep": [
                                         {"name": "a", "adapters": 2, "concurrency": 1, "traffic": "uniform",
                                          "max_loras": [1, 2]}]})
    out = tmp_path / "run"
    start_run(spec, out, ["test"])
    result = run_experiment(out, progress=False, report=False)
    assert result.ran == 0 and len(result.failed) == 2
    failures = sorted((out / "failures").glob("*.txt"))
    assert len(failures) == 2 and "server exited" in failures[0].read_text()
    assert finished_cells(out) == set()
    again = run_experiment(out, progress=False, report=False)  # a resume retries them
    assert len(again.failed) == 2 and again.skipped == 0


def test_run_end_to_end_with_report(tmp_path: Path) -> None:
    """`lorascope run --spec` on the embedded engine: cells, report.html with its figures inlined."""
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(SPEC.replace("max_loras = [2, 4]", "max_loras = [2, 12]").replace("adapters = [4, 12]", "adapters = 12"))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "lorascope.cli", "run", "--spec", str(spec_path), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "report:" in done.stdout
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(cells["max_loras"]) == [2, 12] and (cells["ok"] == 48).all()
    assert (cells["mem_source"] == "measured").all() and (cells["mem_adapter_slots_bytes"] > 0).all()
    # the embedded engine's exact per-step histogram: never more distinct adapters than slots
    assert (cells["active_adapters_p90"] <= cells["max_loras"]).all() and (cells["active_adapters_mean"] > 0).all()
    html = (out / "report.html").read_text()
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "max_loras_ucurve.png" in figures and "ttft_cdf.png" in figures
    assert html.count("data:image/png;base64,") >= len(figures) >= 5
    assert 'src="http' not in html


@pytest.mark.vllm
@pytest.mark.slow
def test_quick_preset_on_vllm_cpu(tmp_path: Path, vllm_python: Path) -> None:
    """`lorascope run --preset quick --engine vllm` on vLLM-CPU: every cell of the preset's grid (less
    its fair-policy sweep) completes against a fresh vLLM server. Fewer requests per cell than the
    preset's 96 keep CI short (a full run's numbers are in benchmarks/RESULTS.md)."""
    out = tmp_path / "run"
    cmd = f"{vllm_python} -m vllm.entrypoints.openai.api_server"
    done = subprocess.run([sys.executable, "-m", "lorascope.cli", "run", "--preset", "quick", "--engine", "vllm",
                           "--vllm-cmd", cmd, "--set", "requests=16", "--set", "warmup=2", "--set", "output_len=8",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = pd.read_csv(out / "cells.csv")
    from lorascope.experiment import load_preset

    expected = load_preset("quick").with_overrides(engine="vllm")
    assert set(zip(cells["cell_id"], cells["repetition"], strict=True)) == {(c.cell_id, r) for c, r in expected.runs()}
    assert (cells["engine"] == "vllm").all() and (cells["ok"] == 16).all()
    assert (cells["mem_source"] == "estimated").all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine_versions"]["vllm"].startswith("0.")
    assert (out / "report.html").exists()
