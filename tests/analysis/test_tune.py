"""The tune model: Che's approximation against a real LRU, the slot model's shape and the study's
setting, bad input, the CLI function, and (slow) the recommendation against a measured CPU sweep."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lorascope.analysis.tune import (
    best_region,
    candidates,
    che_hit_ratio,
    che_time,
    confirm,
    lru_hit_ratio_simulated,
    recommend,
    slot_table,
    throughput_noise,
)
from lorascope.loadgen.workload import parse_traffic


@pytest.mark.parametrize("m", [10, 40])
def test_che_matches_a_direct_lru_simulation(m: int) -> None:
    p = parse_traffic("zipf:1.2").probabilities(200)
    simulated = lru_hit_ratio_simulated(p, m, draws=20_000, seed=1)
    assert abs(che_hit_ratio(p, m) - simulated) < 0.02, (che_hit_ratio(p, m), simulated)
    assert 0.3 < simulated < 0.99  # a regime where the cache size matters, so the check has teeth


def test_che_time_solves_its_equation() -> None:
    p = parse_traffic("zipf:1.5").probabilities(500)
    t = che_time(p, 37)
    assert abs(-np.expm1(-p * t).sum() - 37) < 1e-6


def test_uniform_and_full_cache_edge_cases() -> None:
    p = parse_traffic("uniform").probabilities(100)
    assert che_hit_ratio(p, 25) == pytest.approx(0.25)
    t = che_time(p, 25)  # the closed form: T = -N ln(1 - M/N), hit = 1 - exp(-T/N) = M/N
    assert t == pytest.approx(-100 * np.log(1 - 0.25), rel=1e-9)
    assert 1 - np.exp(-t / 100) == pytest.approx(0.25, rel=1e-9)
    assert che_hit_ratio(p, 100) == 1.0 and che_hit_ratio(p, 1000) == 1.0
    assert che_hit_ratio(parse_traffic("zipf:1.5").probabilities(30), 30) == 1.0
    assert che_hit_ratio(p, 0) == 0.0
    rec = recommend(100, "uniform", 8)
    assert rec.max_loras == 8 and rec.max_cpu_loras == 99  # uniform: 99% hit needs 99 of 100
    assert recommend(5, "uniform", 32).max_cpu_loras == 5  # M >= N: hit 1


def test_delayed_fraction_falls_to_zero_and_slo_asks_for_more() -> None:
    for n, law, c in [(500, "zipf:1.5", 32), (20, "uniform", 64), (1000, "power:0.5", 16)]:
        rows, distinct = slot_table(parse_traffic(law).probabilities(n), c, samples=5000)
        delayed = [r.delayed_fraction for r in rows]
        assert len(rows) == min(n, c)
        assert all(a >= b for a, b in itertools.pairwise(delayed)), delayed
        assert delayed[0] > 0 and delayed[-1] == 0.0
        assert distinct.max() <= min(n, c)
        without, with_slo = recommend(n, law, c), recommend(n, law, c, slo_ttft_ms=500)
        assert with_slo.max_loras >= without.max_loras
        assert with_slo.delayed_fraction <= 0.01
        assert without.max_loras <= min(n, c) and without.max_cpu_loras >= without.max_loras


def test_one_adapter_and_one_request() -> None:
    one = recommend(1, "zipf:1.5", 32)
    assert (one.max_loras, one.max_cpu_loras, one.delayed_fraction, one.host_hit_ratio) == (1, 1, 0.0, 1.0)
    single = recommend(500, "zipf:1.5", 1)
    assert single.max_loras == 1 and single.delayed_fraction == 0.0


def test_the_studys_setting() -> None:
    rec = recommend(500, "zipf:1.5", 32)
    assert 12 <= rec.max_loras <= 20, rec.explanation  # the study: 16 fine, 8 a cliff
    assert rec.delayed_at(8) > 0.02
    assert rec.expected_distinct == pytest.approx(13.0, abs=0.1)
    assert rec.p90_distinct == 16 and rec.p99_distinct >= rec.p90_distinct
    assert "13.0 distinct adapters" in rec.explanation and f"max_loras {rec.max_loras}" in rec.explanation
    assert candidates(rec) == [rec.max_loras // 2, rec.max_loras, 2 * rec.max_loras]
    assert "fair policy" in recommend(500, "zipf:1.5", 32, policy="fair").explanation


def test_host_memory_budget() -> None:
    fits = recommend(500, "zipf:1.5", 32, adapter_bytes=13_000_000, host_memory_gb=20)
    assert fits.max_cpu_loras == 500 and fits.host_hit_ratio == 1.0 and "all 500 adapters fit" in fits.explanation
    tight = recommend(500, "zipf:1.5", 32, adapter_bytes=13_000_000, host_memory_gb=1)
    assert tight.max_cpu_loras == 76 and tight.host_fit == 76 and "do not fit" in tight.explanation
    assert tight.host_hit_ratio < 0.99


def test_candidates_are_clipped() -> None:
    rec = recommend(3, "uniform", 32)
    assert rec.max_loras == 3 and candidates(rec) == [2, 3, 6]
    assert candidates(recommend(1, "uniform", 4)) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"num_adapters": 0}, "adapters"),
        ({"concurrency": 0}, "concurrency"),
        ({"traffic": "zipfian:2"}, "traffic"),
        ({"slo_ttft_ms": -5}, "SLO"),
        ({"policy": "lifo"}, "policy"),
        ({"host_memory_gb": 4}, "both"),
    ],
)
def test_bad_input_names_the_problem(kwargs: dict, names: str) -> None:
    args = {"num_adapters": 50, "traffic": "zipf:1.5", "concurrency": 8} | kwargs
    with pytest.raises(ValueError, match=names):
        recommend(**args)


def _rows(points: dict[int, tuple[float, float]]) -> list[dict]:
    return [{"max_loras": k, "output_tok_s": t, "ttft_ms_p99": p} for k, (t, p) in points.items()]


def test_best_region_and_confirm() -> None:
    rows = _rows(
        {4: (1085, 8034), 8: (1628, 4305), 16: (2160, 170), 32: (2150, 152), 64: (2000, 155), 128: (1763, 162)}
    )
    assert best_region(rows) == [16, 32, 64]  # the study's sweep: within 10% of 2160 and p99 within 2x of 152
    assert best_region(rows, slo_ttft_ms=160) == [32, 64]
    assert best_region(rows, slo_ttft_ms=10) == [16, 32, 64]  # none meets it: fall back to 2x the best tail
    assert best_region(rows, tolerance=0.0) == [16]
    rec = recommend(500, "zipf:1.5", 32)
    verdict, ok = confirm(rec, rows)
    assert ok and "confirmed" in verdict
    verdict, ok = confirm(rec, _rows({8: (1000, 100), 32: (2000, 100), 64: (2100, 100)}))
    assert not ok and "below" in verdict and "not measured" in verdict
    verdict, ok = confirm(rec, _rows({8: (2000, 100), 16: (1000, 100), 32: (2000, 100)}))
    assert not ok and "not in" in verdict  # measured, and outside the region although between its ends
    repeated = [
        *_rows({8: (900, 100), 16: (1000, 100)}),
        *_rows({8: (1000, 100), 16: (400, 100)}),
        *_rows({16: (1000, 100)}),
    ]
    assert best_region(repeated) == [8, 16]  # medians: 8 -> 950, 16 -> 1000
    # 20% apart: resolved by tight repetitions, not by repetitions that scatter +-30%.
    tight = _rows({8: (800, 100), 16: (1000, 100)}) + _rows({8: (810, 100), 16: (990, 100)})
    assert throughput_noise(tight) < 0.02 and best_region(tight) == [16]
    loose = [
        *_rows({8: (800, 100), 16: (1000, 100)}),
        *_rows({8: (1100, 100), 16: (700, 100)}),
        *_rows({8: (560, 100), 16: (1300, 100)}),
    ]  # the same medians, 800 and 1000
    assert throughput_noise(loose) > 0.2 and best_region(loose) == [8, 16]
    with pytest.raises(ValueError, match="lacks"):
        best_region([{"max_loras": 8}])


def test_cli_function(tmp_path: Path) -> None:
    from lorascope.tunecmd import tune

    app = typer.Typer()
    app.command("tune")(tune)
    app.command("other")(lambda: None)  # two commands: `tune` is addressed by name, as under cli.py
    result = CliRunner().invoke(
        app,
        [
            "tune",
            "--adapters",
            "500",
            "--traffic",
            "zipf:1.5",
            "--concurrency",
            "32",
            "--host-memory-gb",
            "20",
            "--adapter-mb",
            "13",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "--max-loras 16" in result.output and "--max-cpu-loras 500" in result.output
    at8 = recommend(500, "zipf:1.5", 32).delayed_at(8)
    assert f"{100 * at8:.2f}%" in result.output and at8 > 0.02  # the table's row at 8
    bad = CliRunner().invoke(app, ["tune", "--adapters", "0", "--traffic", "zipf:1.5", "--concurrency", "32"])
    assert isinstance(bad.exception, ValueError) and "adapters" in str(bad.exception)
    with pytest.raises(ValueError, match="both"):
        tune(adapters=10, traffic="uniform", concurrency=4, host_memory_gb=1.0, adapter_mb=None)


@pytest.mark.slow
def test_recommendation_lies_in_the_measured_best_region(tmp_path: Path) -> None:
    from lorascope.bench import BenchSpec, run_bench
    from lorascope.loadgen.targets import CellKnobs

    rec = recommend(50, "zipf:1.5", 16)
    grid = sorted({1, 2, 4, 8, 16, rec.max_loras})  # measure the recommendation itself, as `tune --measure` does
    rows = []
    for repetition in range(REPETITIONS):  # interleaved, so a burst of load elsewhere hits one repetition of each
        for ml in grid:
            knobs = CellKnobs(max_loras=ml, max_cpu_loras=max(ml, rec.max_cpu_loras), policy="vllm")
            spec = BenchSpec(
                engine="embedded",
                model="tiny",
                num_adapters=50,
                traffic="zipf:1.5",
                concurrency=16,
                requests=64,
                warmup=8,
                input_len="32",
                output_len="24",
                cell_id=f"tune-ml{ml}",
                repetition=repetition,
                knobs=knobs,
            )
            rows.append(run_bench(spec, tmp_path, progress=False))
    region = best_region(rows, tolerance=0.10)
    verdict, ok = confirm(rec, rows)
    table = [(r["max_loras"], round(r["output_tok_s"]), round(r["ttft_ms_p99"])) for r in rows]
    assert ok, f"{verdict}; region {region}; measured (max_loras, tok/s, p99 ms): {table}"
    assert not {1, 2} & set(region)  # the cliff: one or two slots for 16 in-flight requests over 50 adapters


REPETITIONS = 3


@pytest.mark.slow
def test_tune_measure_runs_each_candidate_and_gives_a_verdict(tmp_path: Path) -> None:
    """`lorascope tune --measure` through the real command: one fresh server per candidate max_loras."""
    from lorascope.cli import app as real_app

    out = tmp_path / "tune"
    args = ["tune", "--adapters", "12", "--traffic", "zipf:1.5", "--concurrency", "4", "--measure", "--requests", "8",
            "--input-len", "16", "--output-len", "4", "--out", str(out)]
    result = CliRunner().invoke(real_app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    rec = recommend(12, "zipf:1.5", 4)
    cells = (out / "cells.csv").read_text().splitlines()
    assert len(cells) == 1 + len(candidates(rec))
    assert "confirmed" in result.output or "measure more settings" in result.output
    again = CliRunner().invoke(real_app, args, terminal_width=200)
    assert again.exit_code == 2 and "already holds" in " ".join(again.output.split())
