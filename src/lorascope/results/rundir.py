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
        "lorascope_version": _version(),
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
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def finish_manifest(run_dir: Path, **extra: Any) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    manifest |= extra
    path.write_text(json.dumps(manifest, indent=2, default=str))


def append_cell_row(run_dir: Path, row: dict[str, Any]) -> None:
    """cells.csv: one header row, then one row per cell x repetition (columns fixed by the first row)."""
    path = run_dir / "cells.csv"
    new = not path.exists()
    if not new:
        with path.open() as f:
            header = next(csv.reader(f))
        unknown = set(row) - set(header)
        if unknown:
            raise ValueError(f"cells.csv has no columns {sorted(unknown)}; start a new run directory")
    else:
        header = list(row)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        if new:
            writer.writeheader()
        writer.writerow(row)


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


def _version() -> str:
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
