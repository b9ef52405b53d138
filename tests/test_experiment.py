"""Experiment specs: TOML parsing, grid expansion, presets, and errors that name the fix."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import pytest

from lorascope.experiment import ExperimentSpec, SpecError, load_preset

SMALL = """
name = "t"
model = "tiny"
requests = 10
[headline]
repetitions = 3
cells = [{ adapters = 100, max_loras = 8 }]
[[sweep]]
name = "a"
adapters = [1, 100]
concurrency = [8, 32]
traffic = "uniform"
max_loras = 32
[[sweep]]
name = "b"
adapters = 100
concurrency = 32
traffic = ["zipf:1.5"]
max_loras = [8, 16]
policy = ["vllm", "fair"]
"""


def _spec(tmp_path: Path, text: str) -> ExperimentSpec:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return ExperimentSpec.from_toml(path)


def test_grid_expands_in_order_with_headline_repetitions(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SMALL)
    cells = spec.cells()
    assert [(c.sweep, c.adapters, c.concurrency) for c in cells[:4]] == [("a", 1, 8), ("a", 1, 32), ("a", 100, 8), ("a", 100, 32)]
    b = [c for c in cells if c.sweep == "b"]
    assert [(c.max_loras, c.policy) for c in b] == [(8, "vllm"), (8, "fair"), (16, "vllm"), (16, "fair")]
    assert [c.repetitions for c in b] == [3, 3, 1, 1]  # the headline filter matches max_loras 8 only
    assert len({c.cell_id for c in cells}) == len(cells) == 8
    runs = spec.runs()
    assert len(runs) == 8 + 2 * 2
    # every cell's first repetition runs before any second one (a short run still covers the grid)
    first_second = next(i for i, (_, rep) in enumerate(runs) if rep == 1)
    assert all(rep == 0 for _, rep in runs[:first_second]) and first_second == 8


def test_round_trip_through_the_manifest_form(tmp_path: Path) -> None:
    spec = _spec(tmp_path, SMALL)
    again = ExperimentSpec.from_dict(spec.to_dict())
    assert [c.cell_id for c in again.cells()] == [c.cell_id for c in spec.cells()]
    assert [c.repetitions for c in again.cells()] == [c.repetitions for c in spec.cells()]


def test_presets_load_and_seed_is_the_studys_63_cells() -> None:
    seed = load_preset("seed")
    cells = seed.cells()
    assert len(cells) == 63
    study_csv = Path(str(resources.files("lorascope") / "data" / "study_cells.csv"))
    with study_csv.open() as f:
        study = {(r["sweep_inferred"][0], r["traffic"], int(r["concurrency"]), int(r["max_loras"]), int(r["num_adapters_N"]))
                 for r in csv.DictReader(f)}
    ours = {(c.sweep, "uniform" if c.traffic == "uniform" else "zipf_s1.5", c.concurrency, c.max_loras, c.adapters)
            for c in cells}
    assert ours == study
    assert seed.requests == 1000 and seed.warmup == 50 and seed.input_len == "128" and seed.output_len == "128"
    assert {c.rank for c in cells} == {16} and seed.targets == "q_proj,v_proj"
    quick = load_preset("quick")
    assert 15 <= len(quick.runs()) <= 40
    assert any(c.repetitions >= 3 for c in quick.cells())
    fair = load_preset("fair-vs-vllm")
    assert {c.policy for c in fair.cells()} == {"fair", "vllm"}


def test_engine_override_replaces_every_sweep_and_drops_the_policy_axis() -> None:
    quick = load_preset("quick")
    on_vllm = quick.with_overrides(engine="vllm")  # its fair-only "policy" sweep goes; the rest run on vLLM
    assert {c.sweep for c in on_vllm.cells()} == {c.sweep for c in quick.cells()} - {"policy"}
    assert {(c.engine, c.policy) for c in on_vllm.cells()} == {("vllm", "vllm")}
    fair = load_preset("fair-vs-vllm").with_overrides(engine="vllm")  # both policies collapse to vLLM's own
    assert len(fair.cells()) == len(load_preset("fair-vs-vllm").cells()) // 2
    only_fair = ExperimentSpec.from_dict({"name": "f", "sweep": [{"name": "a", "adapters": 1, "concurrency": 1,
                                                                  "traffic": "uniform", "max_loras": 1, "policy": "fair"}]})
    with pytest.raises(SpecError, match="--engine embedded"):
        only_fair.with_overrides(engine="vllm")
    spec = load_preset("seed").with_overrides(engine="vllm", model="/models/x")
    assert {c.engine for c in spec.cells()} == {"vllm"} and {c.policy for c in spec.cells()} == {"vllm"}
    assert spec.model == "/models/x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\n', r"no \[\[sweep\]\]"),
        ('name = "x"\nbogus = 1\n[[sweep]]\nadapters = 1\nconcurrency = 1\ntraffic = "uniform"\nmax_loras = 1\n',
         r"unknown key\(s\) \['bogus'\]"),
        ('name = "x"\n[[sweep]]\nadapters = 1\ntraffic = "uniform"\nmax_loras = 1\n', "exactly one of concurrency"),
        ('name = "x"\n[[sweep]]\nadapters = 1\nconcurrency = 1\nrate = 2\ntraffic = "uniform"\nmax_loras = 1\n',
         "exactly one of concurrency"),
        ('name = "x"\n[[sweep]]\nadapters = 0\nconcurrency = 1\ntraffic = "uniform"\nmax_loras = 1\n',
         "adapters values must be positive"),
        ('name = "x"\n[[sweep]]\nadapters = 1\nconcurrency = 1\ntraffic = "zipf:-1"\nmax_loras = 1\n', "traffic 'zipf:-1'"),
        ('name = "x"\n[[sweep]]\nadapters = 1\nconcurrency = 1\ntraffic = "uniform"\nmax_loras = 8\nmax_cpu_loras = 4\n',
         "max_cpu_loras 4 < max_loras 8"),
        ('name = "x"\n[[sweep]]\nadapters = 1\nconcurrency = 1\ntraffic = "uniform"\nmax_loras = 1\npolicy = "lifo"\n',
         "policy must be one of"),
        ('name = "x"\nrequests = 0\n[[sweep]]\nadapters = 1\nconcurrency = 1\ntraffic = "uniform"\nmax_loras = 1\n',
         "requests must be a positive integer"),
        ('name = "x"\n[[sweep]]\nname = "a"\nadapters = 1\nconcurrency = 1\ntraffic = "uniform"\nmax_loras = 1\n'
         '[[sweep]]\nname = "a"\nadapters = 2\nconcurrency = 1\ntraffic = "uniform"\nmax_loras = 1\n', "sweep names repeat"),
        ("name = [", "not valid TOML"),
    ],
)
def test_bad_specs_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, text)


def test_missing_file_and_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        ExperimentSpec.from_toml(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="choose one of quick, seed, fair-vs-vllm"):
        load_preset("fast")


def test_set_overrides_run_wide_keys_only() -> None:
    quick = load_preset("quick")
    small = quick.with_overrides(sets=["requests=16", "output_len=8", "slo_ttft_ms=250.5", "vllm_cmd=my vllm serve"])
    assert (small.requests, small.output_len, small.slo_ttft_ms, small.vllm_cmd) == (16, "8", 250.5, "my vllm serve")
    assert [c.cell_id for c in small.cells()] == [c.cell_id for c in quick.cells()]
    with pytest.raises(SpecError, match="KEY one of"):
        quick.with_overrides(sets=["adapters=5"])
    with pytest.raises(SpecError, match="requests must be a positive integer"):
        quick.with_overrides(sets=["requests=0"])
