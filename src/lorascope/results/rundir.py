"""The run directory (DESIGN.md): manifest.json, requests.parquet/, cells.csv, server_metrics.parquet/.

Everything is appended per finished cell x repetition, so a finished cell is never lost, and any
report can be rebuilt from these files alone.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pandas as pd


def write_manifest(run_dir: Path, spec: dict[str, Any], engine: dict[str, Any], command: list[str]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "manifest.json"
    manifest = {
        "lorascope_version": lorascope_version(),
        "spec": spec,
        "engine": engine,
        "command": command,
        "python": sys.version.split()[0],
        "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                 "processor": platform.processor()},
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "finished": None,
    }
    manifest["host"] |= _gpu()
    _write_json(path, manifest)
    return path


def finish_manifest(run_dir: Path, **extra: Any) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    manifest |= extra
    _write_json(path, manifest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (tmp + rename): a run killed mid-write keeps the previous manifest whole."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def summary_file(run_dir: Path, cell_id: str, repetition: int) -> Path:
    return run_dir / "summaries" / f"{cell_id}-rep{repetition}.json"


def write_summary(run_dir: Path, cell_id: str, repetition: int, row: dict[str, Any]) -> Path:
    """One cell x repetition's summary row, written atomically before its records (which mark it finished)."""
    path = summary_file(run_dir, cell_id, repetition)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row, default=str))
    os.replace(tmp, path)
    return path


def read_summaries(run_dir: Path) -> list[dict[str, Any]]:
    """The summary rows of every *finished* cell x repetition (its records are on disk), oldest first.
    A summary whose records never landed (killed in between) belongs to an unfinished cell: skipped."""
    from lorascope.results.records import finished_cells

    done = finished_cells(run_dir)
    rows = []
    for path in sorted((run_dir / "summaries").glob("*-rep*.json")):
        cell, _, rep = path.stem.rpartition("-rep")
        if (cell, int(rep)) in done:
            rows.append(json.loads(path.read_text()))
    return sorted(rows, key=lambda r: (r.get("finished_at") or 0, r["cell_id"], r["repetition"]))


def write_cells_csv(run_dir: Path) -> Path:
    """cells.csv: one header row, then one row per finished cell x repetition. Rebuilt from the
    per-cell summaries (atomically), so it can never hold a half-written row or a lost cell."""
    rows = read_summaries(run_dir)
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    path = run_dir / "cells.csv"
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def write_server_metrics(run_dir: Path, cell_id: str, repetition: int, rows: list[dict[str, Any]]) -> Path | None:
    if not rows:
        return None
    folder = run_dir / "server_metrics.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cell_id}-rep{repetition}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def lorascope_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorascope")
    except PackageNotFoundError:
        return "unknown"


def _gpu() -> dict[str, Any]:
    try:
        import torch

        if torch.cuda.is_available():
            return {"gpu": torch.cuda.get_device_name(), "gpu_count": torch.cuda.device_count()}
    except ImportError:
        pass
    return {"gpu": None}
