"""One record per request, and the run directory's `requests.parquet` that holds them.

`requests.parquet` is a directory dataset: one file per finished cell x repetition, written to a
temporary name and renamed, so a cell that finished is never lost or half-written, a killed run
resumes by looking at which files exist, and `pandas.read_parquet("requests.parquet")` reads the
whole run as one table.

Times are seconds on one monotonic clock of the client process, measured from the cell's start.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

STATUSES = ("ok", "error", "refused", "timeout")


@dataclass(slots=True)
class RequestRecord:
    cell_id: str
    repetition: int
    index: int  # the request's index in the workload
    adapter: str | None  # None: the base model
    warmup: bool
    intended_send_s: float | None  # when the arrival process meant to send it (None: closed loop)
    actual_send_s: float  # when the client sent it
    first_token_s: float | None = None  # first chunk carrying a token
    end_s: float | None = None  # last byte of the response
    prompt_tokens: int | None = None  # from the server's `usage`
    output_tokens: int | None = None  # from the server's `usage`
    client_prompt_tokens: int = 0  # what the client sent (token-id prompts: exact)
    client_output_tokens: int = 0  # tokens the client counted in the stream
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    chunk_tokens: list[int] = field(default_factory=list)  # tokens each of those chunks carried
    status: str = "ok"  # ok | error | refused (429) | timeout
    http_status: int | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def send_origin_s(self) -> float:
        """Where latency is measured from: the intended send time when there is one."""
        return self.actual_send_s if self.intended_send_s is None else self.intended_send_s


COLUMNS = [f.name for f in fields(RequestRecord)]


def records_frame(records: list[RequestRecord]) -> pd.DataFrame:
    frame = pd.DataFrame([asdict(r) for r in records], columns=COLUMNS)
    return frame.astype({"adapter": "object", "error": "object"})


def cell_file(run_dir: Path, cell_id: str, repetition: int) -> Path:
    return run_dir / "requests.parquet" / f"{cell_id}-rep{repetition}.parquet"


def write_cell(run_dir: Path, cell_id: str, repetition: int, records: list[RequestRecord]) -> Path:
    """Write one finished cell atomically (tmp file + rename); refuses to overwrite a finished cell."""
    if not records:
        raise ValueError(f"cell {cell_id} rep {repetition}: no records to write")
    path = cell_file(run_dir, cell_id, repetition)
    if path.exists():
        raise FileExistsError(f"{path} exists: cell {cell_id} rep {repetition} already finished (resume skips it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    records_frame(records).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def finished_cells(run_dir: Path) -> set[tuple[str, int]]:
    """(cell_id, repetition) of every cell whose records are on disk."""
    folder = run_dir / "requests.parquet"
    if not folder.is_dir():
        return set()
    done = set()
    for f in folder.glob("*-rep*.parquet"):
        cell, _, rep = f.stem.rpartition("-rep")
        done.add((cell, int(rep)))
    return done


def read_records(run_dir: Path) -> pd.DataFrame:
    folder = run_dir / "requests.parquet"
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
