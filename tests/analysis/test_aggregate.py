"""Aggregation over repetitions: the grouping key, and the 95% CI against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from lorascope.analysis.aggregate import aggregate, ci95, group_ids, read_cells, t975


def _row(sweep: str, cell_id: str, rep: int, tok_s: float, max_loras: int = 8, concurrency: float | None = 32,
         ttft: float = 100.0) -> dict:
    return {"sweep": sweep, "cell_id": cell_id, "repetition": rep, "engine": "embedded", "policy": "vllm",
            "model": "tiny", "adapters": 100, "rank": 16, "traffic": "zipf:1.5", "concurrency": concurrency,
            "rate": None, "arrival": None, "input_len": 32, "output_len": 16, "max_loras": max_loras,
            "max_cpu_loras": None, "max_lora_rank": 16, "slo_ttft_ms": None, "slo_tpot_ms": None,
            "output_tok_s": tok_s, "ttft_ms_p99": ttft, "finished_at": 1.0 + rep}


def test_t_table() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(4) == pytest.approx(2.776)
    assert t975(30) == pytest.approx(2.042)
    assert 2.021 > t975(50) > 2.000  # interpolated between the table's 40 and 60
    assert t975(10_000) == pytest.approx(1.96, abs=0.001)
    assert math.isnan(t975(0))


def test_ci_against_a_hand_computation() -> None:
    # mean 12, s = 2 (deviations -2, 0, 2: sum of squares 8, / 2 = 4), half-width = 4.303 * 2 / sqrt(3) = 4.9687
    mean, n, half = ci95([10.0, 12.0, 14.0])
    assert (mean, n) == (12.0, 3)
    assert half == pytest.approx(4.303 * 2 / math.sqrt(3), rel=1e-9)
    assert half == pytest.approx(4.9687, abs=1e-4)
    mean, n, half = ci95([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(half)
    mean, n, half = ci95([1.0, float("nan"), 3.0])  # NaN is not a measurement
    assert (mean, n) == (2.0, 2) and half == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))


def test_equal_parameters_from_different_sweeps_are_repetitions() -> None:
    cells = pd.DataFrame([
        _row("traffic", "traffic-n100-ml8", 0, 1000.0),
        _row("max_loras", "max_loras-n100-ml8", 0, 1200.0),
        _row("max_loras", "max_loras-n100-ml8", 1, 1400.0),
        _row("max_loras", "max_loras-n100-ml32", 0, 900.0, max_loras=32),
    ])
    agg = aggregate(cells)
    assert len(agg) == 2
    eight = agg[agg["max_loras"] == 8].iloc[0]
    assert eight["n"] == 3 and eight["output_tok_s_n"] == 3
    assert eight["output_tok_s"] == pytest.approx(1200.0)
    assert eight["output_tok_s_ci95"] == pytest.approx(4.303 * 200.0 / math.sqrt(3))
    assert eight["sweeps"] == "traffic,max_loras"
    assert set(eight["cell_ids"].split(",")) == {"traffic-n100-ml8", "max_loras-n100-ml8"}
    lone = agg[agg["max_loras"] == 32].iloc[0]
    assert lone["n"] == 1 and math.isnan(lone["output_tok_s_ci95"])
    # group_ids numbers the rows the same way aggregate numbers its groups
    ids = group_ids(cells)
    assert list(ids) == [eight["group"]] * 3 + [lone["group"]]


def test_missing_parameters_group_together_and_split_from_set_ones() -> None:
    cells = pd.DataFrame([_row("open", "o1", 0, 10.0, concurrency=None), _row("open", "o1", 1, 20.0, concurrency=None),
                          _row("closed", "c1", 0, 30.0, concurrency=32)])
    agg = aggregate(cells)
    assert sorted(agg["n"]) == [1, 2]
    open_loop = agg[agg["concurrency"].isna()].iloc[0]
    assert open_loop["output_tok_s"] == pytest.approx(15.0)


def test_read_cells_round_trip(tmp_path: Path) -> None:
    pd.DataFrame([_row("a", "x", 0, 1.0), _row("b", "y", 0, 3.0)]).to_csv(tmp_path / "cells.csv", index=False)
    agg = aggregate(read_cells(tmp_path))
    assert len(agg) == 1 and agg["output_tok_s"].iloc[0] == pytest.approx(2.0)
    assert agg["output_tok_s_ci95"].iloc[0] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert aggregate(read_cells(tmp_path / "nowhere")).empty
