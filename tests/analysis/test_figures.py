"""The run directory's figures, drawn from small but real run directories written here from code
(request records, summaries, cells.csv, server metrics, manifest), without starting any server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lorascope.analysis.figures import FIGURES, draw, draw_all, hardware, load_run, workload
from lorascope.loadgen.workload import parse_traffic
from lorascope.results.records import RequestRecord, records_frame, write_cell
from lorascope.results.rundir import (
    finish_manifest,
    write_cells_csv,
    write_manifest,
    write_server_metrics,
    write_summary,
)
from lorascope.results.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLOT_BYTES, HOST_BYTES = 622_592, 114_688


def cell(sweep: str, n: int, traffic: str, c: int, max_loras: int, policy: str = "vllm", rep: int = 0,
         speed: float = 1.0, model: str = "tiny") -> dict:
    law = traffic.replace(":", "")
    return {"sweep": sweep, "cell_id": f"{sweep}-n{n}-c{c}-{law}-ml{max_loras}-{policy}", "repetition": rep,
            "adapters": n, "traffic": traffic, "concurrency": c, "max_loras": max_loras, "policy": policy,
            "speed": speed, "model": model}


def _records(spec: dict, requests: int, seed: int) -> list[RequestRecord]:
    """A closed-loop cell: c requests in flight, adapters drawn from the traffic law; adapters beyond
    max_loras' share wait longer (the vllm policy's skipped requests), so TTFT depends on the knob."""
    rng = np.random.default_rng(seed)
    n, c, ml = spec["adapters"], spec["concurrency"], spec["max_loras"]
    try:
        p = parse_traffic(spec["traffic"]).probabilities(n)
    except ValueError:
        p = np.full(n, 1.0 / n)
    picks = rng.choice(n, size=requests, p=p)
    tpot = 0.01 / spec["speed"] * (1 + 0.002 * min(n, c))
    out, free = [], [0.0] * c
    for i, k in enumerate(picks):
        slot = int(np.argmin(free))
        send = free[slot]
        wait = 0.02 + (0.3 if k >= ml else 0.0) * rng.random()
        first = send + wait
        chunks = [first + j * tpot for j in range(16)]
        out.append(RequestRecord(spec["cell_id"], spec["repetition"], i, f"a{k:04d}", False, None, send, first,
                                 chunks[-1], 32, 16, 32, 16, chunks, [1] * 16))
        free[slot] = chunks[-1]
    out.insert(0, RequestRecord(spec["cell_id"], spec["repetition"], -1, "a0000", True, None, 0.0, 0.01, 0.02, 8, 2,
                                8, 2, [0.01, 0.02], [1, 1]))
    return out


def _server_rows(spec: dict, active: float) -> list[dict]:
    rows = []
    for t, steps in enumerate((0, 10, 25, 40, 60)):
        for metric, value in (("lorascope:step_adapters_count", steps), ("lorascope:step_adapters_sum", steps * active)):
            rows.append({"cell_id": spec["cell_id"], "repetition": spec["repetition"], "t_s": 0.5 * t, "metric": metric,
                         "labels": "{}", "value": float(value)})
    return rows


def build_run(root: Path, cells: list[dict], requests: int = 40, spec: dict | None = None) -> Path:
    """A run directory as `lorascope run` writes it: records, summaries, server metrics, cells.csv, manifest."""
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, spec or {"name": "test-run", "preset": "quick"}, {"name": "embedded", "version": "0.1.0"},
                   ["lorascope", "run", "--preset", "quick"])
    for i, spec_ in enumerate(cells):
        records = _records(spec_, requests, seed=i)
        n, c, ml = spec_["adapters"], spec_["concurrency"], spec_["max_loras"]
        try:
            p = parse_traffic(spec_["traffic"]).probabilities(n)
            predicted = float((1 - (1 - p) ** c).sum())
        except ValueError:
            predicted = float("nan")
        active = min(predicted, ml) * 0.85 if math.isfinite(predicted) else 1.0
        row = {"sweep": spec_["sweep"], "cell_id": spec_["cell_id"], "repetition": spec_["repetition"],
               "engine": "embedded", "model": spec_["model"], "base_model": spec_["model"], "adapters": n, "rank": 16,
               "traffic": spec_["traffic"], "concurrency": c, "rate": None, "arrival": None, "input_len": 32,
               "output_len": 16, "max_loras": ml, "max_cpu_loras": None, "max_lora_rank": 16,
               "policy": spec_["policy"], "warmup_mode": "workload", "slo_ttft_ms": None, "slo_tpot_ms": None,
               "predicted_distinct": predicted, "predicted_p90_distinct": math.ceil(predicted * 1.2) if math.isfinite(predicted) else None,
               "active_adapters_mean": active, "active_adapters_p90": math.ceil(active),
               "active_adapters_source": "every step", "mem_weights_bytes": 3_940_864.0,
               "mem_kv_cache_bytes": 268_435_456.0, "mem_adapter_slots_bytes": float(ml * SLOT_BYTES),
               "mem_host_tier_bytes": float(min(n, ml) * HOST_BYTES), "mem_source": "measured"}
        row |= summarize(records_frame(records))
        row |= {"loop_lag_p99_ms": 1.5, "scrape_failures": 0, "finished_at": 1_700_000_000.0 + i}
        write_summary(root, spec_["cell_id"], spec_["repetition"], row)
        write_server_metrics(root, spec_["cell_id"], spec_["repetition"], _server_rows(spec_, active))
        write_cell(root, spec_["cell_id"], spec_["repetition"], records)
    write_cells_csv(root)
    finish_manifest(root)
    return root


def full_cells() -> list[dict]:
    cells = [cell("concurrency", n, "uniform", c, 32, speed=1.0 + c / 8 - n / 400) for n in (1, 10, 100) for c in (4, 16)]
    cells += [cell("traffic", n, "zipf:1.5", 16, 32, speed=2.0 - n / 300) for n in (10, 100)]
    # The max_loras sweep, with one cell missing (N=100, max_loras 2) and one measured twice.
    cells += [cell("max_loras", n, "zipf:1.5", 16, ml, speed=1.0 + ml / 40) for n in (10, 100) for ml in (2, 8, 32)
              if (n, ml) != (100, 2)]
    cells += [cell("max_loras", 100, "zipf:1.5", 16, 8, rep=1, speed=1.3)]
    cells += [cell("policy", 100, "zipf:1.5", 16, ml, policy="fair", speed=1.1 + ml / 50) for ml in (8, 32)]
    return cells


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("full") / "run", full_cells())


@pytest.fixture(scope="module")
def drawn(full_run: Path) -> dict:
    data = load_run(full_run)
    return draw(data)


def _title(path: Path) -> str:
    with Image.open(path) as image:
        return image.text.get("Title", "")  # type: ignore[attr-defined]


def test_every_figure_is_a_readable_png_with_its_title(full_run: Path, drawn: dict) -> None:
    expected = {
        "throughput_vs_adapters": "Output throughput vs number of adapters",
        "uniform_vs_zipf": "uniform vs skewed traffic",
        "heatmap_throughput": "Output throughput over adapters x max_loras",
        "heatmap_ttft_p99": "p99 TTFT over adapters x max_loras",
        "max_loras_ucurve": "Throughput and p99 TTFT vs max_loras",
        "memory": "Memory by component (measured)",
        "ttft_cdf": "TTFT distribution per max_loras",
        "per_adapter": "Per-adapter TTFT vs popularity",
        "working_set": "Working set: predicted vs measured",
        "active_adapters_over_time": "Active adapters per step over time",
        "policy_comparison": "Scheduling policy: fair vs vllm",
    }
    assert set(expected) == set(FIGURES)
    for name, words in expected.items():
        info = drawn[name]
        assert info["reason"] is None, (name, info["reason"])
        path = info["path"]
        assert path == full_run / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500, (name, pixels.shape)
        assert pixels.std() > 0.05, f"{name} looks blank"
        title = _title(path)
        assert words in title, (name, title)
        assert f"on {hardware(json.loads((full_run / 'manifest.json').read_text()))}" in title, (name, title)


def test_titles_state_the_workload(drawn: dict) -> None:
    assert "Uniform traffic, max_loras 32" in drawn["throughput_vs_adapters"]["title"]
    assert "32/16 tokens" in drawn["throughput_vs_adapters"]["title"]
    heat = drawn["heatmap_throughput"]["title"]
    assert "Zipf s=1.5 traffic" in heat and "c=16" in heat
    # The max_loras sweep has both policies: the title must not claim one.
    assert "vllm policy" not in drawn["max_loras_ucurve"]["title"]


def test_workload_names_only_shared_parameters() -> None:
    frame = pd.DataFrame({"traffic": ["uniform", "uniform"], "concurrency": [8, 32], "max_loras": [32, 32],
                          "input_len": [128, 128], "output_len": [64, 64], "model": ["tiny", "tiny"],
                          "engine": ["embedded", "embedded"], "policy": ["vllm", "vllm"]})
    text = workload(frame, {"host": {"gpu": None}})
    assert text == "Uniform traffic, max_loras 32, 128/64 tokens, tiny on CPU (embedded engine, vllm policy)"


def test_draw_all_writes_the_figures_folder(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", [cell("max_loras", 10, "zipf:1.5", 8, ml) for ml in (2, 4)], requests=16)
    paths = draw_all(run)
    assert paths and all(p.parent == run / "figures" and p.exists() for p in paths)
    names = {p.stem for p in paths}
    assert {"max_loras_ucurve", "ttft_cdf", "memory"} <= names
    assert "policy_comparison" not in names and "throughput_vs_adapters" not in names


def test_figures_return_none_without_their_cells(tmp_path: Path) -> None:
    """Uniform cells at one max_loras, one policy, and no request or server-metric files."""
    run = build_run(tmp_path / "run", [cell("concurrency", n, "uniform", 4, 32) for n in (1, 10)], requests=12)
    for folder in ("requests.parquet", "server_metrics.parquet"):
        for f in (run / folder).glob("*.parquet"):
            f.unlink()
    data = load_run(run)
    assert len(data.cells) == 2
    for name in ("uniform_vs_zipf", "heatmap_throughput", "heatmap_ttft_p99", "max_loras_ucurve", "ttft_cdf",
                 "per_adapter", "active_adapters_over_time", "policy_comparison"):
        assert FIGURES[name](data) is None, name
        assert data.info[name]["reason"], name
        assert not (run / "figures" / f"{name}.png").exists()
    assert FIGURES["throughput_vs_adapters"](data) is not None
    assert FIGURES["memory"](data) is not None


def test_an_empty_run_draws_nothing(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert draw_all(tmp_path / "run") == []


def test_the_heatmap_copes_with_a_missing_cell(full_run: Path, drawn: dict) -> None:
    """N=100 x max_loras 2 was not run: the grid is drawn anyway, and the data behind it has a hole."""
    data = load_run(full_run)
    zipf = data.agg[(data.agg["traffic"] == "zipf:1.5") & (data.agg["policy"] == "vllm")]
    assert not ((zipf["adapters"] == 100) & (zipf["max_loras"] == 2)).any()
    assert drawn["heatmap_throughput"]["path"].exists()
    # The repeated cell is aggregated with a CI, which the heatmap prints (n=2).
    twice = zipf[(zipf["adapters"] == 100) & (zipf["max_loras"] == 8)]
    assert int(twice["n"].iloc[0]) == 2 and math.isfinite(float(twice["output_tok_s_ci95"].iloc[0]))
