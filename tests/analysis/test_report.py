"""report.html from real run directories: self-contained (figures as data URIs, nothing fetched),
escaped, with the manifest, findings, recommendation and the study table; and a one-cell run."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path

import pytest

from lorascope.analysis.report import build_report
from lorascope.results.rundir import finish_manifest

_spec = importlib.util.spec_from_file_location("figures_run_builder", Path(__file__).with_name("test_figures.py"))
assert _spec is not None and _spec.loader is not None
_builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_builder)
build_run, cell, full_cells = _builder.build_run, _builder.cell, _builder.full_cells

HOSTILE = "<script>alert(1)</script>"
URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    cells = full_cells()
    hostile = cell(f"sweep{HOSTILE}", 1, "uniform", 32, 32, speed=3.0, model=f"tiny{HOSTILE}")
    hostile["cell_id"] = "hostile-n1-c32-uniform-ml32"  # a file name; the sweep and the model carry the markup
    cells.append(hostile)
    run = build_run(tmp_path_factory.mktemp("report") / "run", cells, spec={"name": f"study {HOSTILE}", "preset": "quick"})
    finish_manifest(run, warnings=["adapter memory was estimated for 1 cell"])
    path = build_report(run)
    return run, path.read_text()


def test_every_figure_is_inlined_as_a_data_uri(report: tuple[Path, str]) -> None:
    run, html = report
    pngs = sorted((run / "figures").glob("*.png"))
    assert len(pngs) == 11
    uris = URI.findall(html)
    assert len(uris) == len(pngs)
    inlined = {base64.b64decode(u) for u in uris}
    assert all(p.read_bytes() in inlined for p in pngs)
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in inlined)


def test_nothing_is_fetched_from_outside(report: tuple[Path, str]) -> None:
    _, html = report
    for pattern in ('src="http', "src='http", 'href="http', "href='http", "<link", "@import", "url(", "<script"):
        assert pattern not in html, pattern
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', html))


def test_everything_is_escaped(report: tuple[Path, str]) -> None:
    _, html = report
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<title>lorascope report: study &lt;script&gt;" in html


def test_manifest_summary_and_findings(report: tuple[Path, str]) -> None:
    run, html = report
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["engine"]["name"] == "embedded"
    assert "embedded 0.1.0" in html
    assert "lorascope run --preset quick" in html
    assert "<details><summary>Full spec</summary>" in html
    assert "adapter memory was estimated for 1 cell" in html  # the manifest's warnings
    # the summary: one row per parameter group, the repeated cell with its CI
    assert re.search(r"<td>2</td><td>[\d,]+ ± [\d,.]+</td>", html)
    assert "Zipf s=1.5 gave" in html and "vs uniform" in html
    assert "p99 TTFT at max_loras 2 was" in html
    assert "the fair policy gave" in html


def test_recommendation_and_study_table(report: tuple[Path, str]) -> None:
    _, html = report
    assert "Best measured" in html
    assert "Working-set model (lorascope tune)" in html and "Following the p90 rule" in html
    # N=1, uniform, c=32, max_loras 32 is a study cell (1,935 tok/s in the study's fig2)
    assert "1,935" in html and "fig2" in html
    assert "The hardware and engine differ" in html


def test_a_run_with_one_cell_still_gives_a_report(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", [cell("bench", 4, "zipf:1.2", 4, 2)], requests=8, spec={"cell_id": "one"})
    html = build_report(run).read_text()
    assert "lorascope report: run" in html
    assert "uniform_vs_zipf.png was skipped: no concurrency/max_loras setting measured under two traffic laws" in html
    assert "policy_comparison.png was skipped" in html
    assert len(URI.findall(html)) == len(list((run / "figures").glob("*.png"))) >= 3
    assert "no setting measured at two or more max_loras values" in html


def test_an_empty_run_gives_a_report(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    html = build_report(tmp_path / "run").read_text()
    assert "No finished cell in this run." in html
    assert not URI.findall(html)
