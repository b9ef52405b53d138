"""Group the rows of cells.csv over repetitions: mean, n and 95% confidence half-width per metric.

A *parameter group* is every row with the same workload and engine settings (the columns of
`PARAMS`). The sweep, cell id and repetition are not part of the key: a cell measured in two sweeps
with equal parameters is two repetitions of one workload.

For each metric m the aggregated frame holds `m` (the mean over the group's finite values), `m_n`
(how many finite values) and `m_ci95`, the half-width t(0.975, n-1) * s / sqrt(n) of the 95%
confidence interval of the mean (s: the sample standard deviation), NaN when n < 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

# The grouping key, in display order. warmup_mode and base_model are parameters too (a different
# warm-up is a different workload); columns a run lacks are simply not part of its key.
PARAMS: tuple[str, ...] = (
    "engine", "policy", "model", "base_model", "adapters", "rank", "traffic", "concurrency", "rate", "arrival",
    "input_len", "output_len", "max_loras", "max_cpu_loras", "max_lora_rank", "warmup_mode",
    "slo_ttft_ms", "slo_tpot_ms",
)
IDS: tuple[str, ...] = ("sweep", "cell_id", "repetition", "finished_at")
# Columns that are functions of the parameters (the working-set model) or labels: first value kept.
LABELS: tuple[str, ...] = ("active_adapters_source", "mem_source")

# Two-sided 95% Student t quantiles t(0.975, df).
_T975: dict[int, float] = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}
_Z975 = 1.960


def t975(df: int) -> float:
    """t(0.975, df): exact table to 30, then interpolated linearly in 1/df towards the normal 1.960."""
    if df < 1:
        return float("nan")
    if df in _T975:
        return _T975[df]
    knots = sorted(_T975)
    if df > knots[-1]:
        lo, hi, t_lo, t_hi = knots[-1], math.inf, _T975[knots[-1]], _Z975
    else:
        lo = max(k for k in knots if k < df)
        hi = min(k for k in knots if k > df)
        t_lo, t_hi = _T975[lo], _T975[hi]
    w = (1 / lo - 1 / df) / (1 / lo - (0 if hi == math.inf else 1 / hi))
    return t_lo + w * (t_hi - t_lo)


def ci95(values: Iterable[float]) -> tuple[float, int, float]:
    """(mean, n, 95% CI half-width) of the finite values; half-width NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(float(v))], dtype=float)
    n = int(x.size)
    if n == 0:
        return float("nan"), 0, float("nan")
    mean = float(x.mean())
    if n < 2:
        return mean, n, float("nan")
    return mean, n, t975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)


def read_cells(run_dir: Path) -> pd.DataFrame:
    """cells.csv as a frame (empty frame when the run has none)."""
    path = Path(run_dir) / "cells.csv"
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=[*IDS, *PARAMS])
    return pd.read_csv(path, keep_default_na=True, dtype={"traffic": str, "sweep": str, "cell_id": str})


def param_columns(cells: pd.DataFrame) -> list[str]:
    return [p for p in PARAMS if p in cells.columns]


def metric_columns(cells: pd.DataFrame) -> list[str]:
    """Numeric columns that are neither parameters nor ids."""
    skip = set(PARAMS) | set(IDS) | set(LABELS)
    return [c for c in cells.columns if c not in skip and pd.api.types.is_numeric_dtype(cells[c])]


_MISSING = "\x00missing"


def group_ids(cells: pd.DataFrame) -> pd.Series:
    """The parameter group (0, 1, ... in order of first appearance) of every row of cells.csv."""
    params = param_columns(cells)
    if cells.empty or not params:
        return pd.Series(0, index=cells.index, dtype=int)
    key = cells[params].astype(object).where(cells[params].notna(), _MISSING).astype(str)
    codes, _ = pd.factorize(key.apply(lambda r: "\x1f".join(r), axis=1), sort=False)
    return pd.Series(codes, index=cells.index, dtype=int)


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per parameter group: `group` (as `group_ids` numbers it), the parameters, `n` (rows),
    `sweeps`, `cell_ids`, and for each metric m: `m` (mean), `m_n`, `m_ci95`. Groups keep the order
    of their first row."""
    params = param_columns(cells)
    metrics = metric_columns(cells)
    if cells.empty:
        return pd.DataFrame(columns=["group", *params, "n", "sweeps", "cell_ids"])
    out = []
    for group, rows in cells.groupby(group_ids(cells), sort=True):
        first = rows.iloc[0]
        row: dict[str, object] = {"group": int(group)} | {p: first[p] for p in params}
        row["n"] = len(rows)
        row["sweeps"] = ",".join(dict.fromkeys(str(s) for s in rows.get("sweep", pd.Series(dtype=str)).dropna()))
        row["cell_ids"] = ",".join(dict.fromkeys(str(s) for s in rows.get("cell_id", pd.Series(dtype=str)).dropna()))
        for label in LABELS:
            if label in rows:
                row[label] = ",".join(dict.fromkeys(str(s) for s in rows[label].dropna()))
        for m in metrics:
            mean, n, half = ci95(rows[m].to_numpy(dtype=float))
            row[m], row[f"{m}_n"], row[f"{m}_ci95"] = mean, n, half
        out.append(row)
    return pd.DataFrame(out)


def aggregate_run(run_dir: Path) -> pd.DataFrame:
    return aggregate(read_cells(run_dir))
