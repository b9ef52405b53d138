"""Per-cell summaries, computed from request records exactly as docs/metrics.md defines them.

- TTFT: first token minus the *intended* send time (actual send time in closed loop); also from
  the actual send time, separately, so client lag and coordinated omission show.
- E2E: end minus the same origin.
- TPOT: (end - first token) / (output tokens - 1), output tokens from the server's `usage`.
- ITL: per token after the first chunk; a chunk carrying k tokens contributes k gaps of
  (its gap to the previous chunk) / k.
- Output throughput: measured output tokens / (last measured end - first measured send); warm-up
  requests are excluded, and so is the drain (the window ends with the last measured request).
- Goodput: measured requests meeting every SLO, per second of that window.
- Fairness: Jain's index over adapters of x_i = 1 / (adapter i's mean E2E per output token).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 99)


def _origin(df: pd.DataFrame) -> pd.Series:
    return df["intended_send_s"].fillna(df["actual_send_s"]).astype(float)


def _tokens(df: pd.DataFrame) -> pd.Series:
    """Output tokens: the server's count, or the client's where the server gave none."""
    return df["output_tokens"].fillna(df["client_output_tokens"]).astype(int)


def itl_values(chunk_times_s: list[float], chunk_tokens: list[int]) -> list[float]:
    gaps: list[float] = []
    for i in range(1, len(chunk_times_s)):
        k = int(chunk_tokens[i])
        if k > 0:
            gaps += [(chunk_times_s[i] - chunk_times_s[i - 1]) / k] * k
    return gaps


def jain_index(values: list[float]) -> float:
    """(sum x)^2 / (n sum x^2): 1 when all equal, 1/n when one adapter gets everything."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    return float(x.sum() ** 2 / (len(x) * (x**2).sum())) if len(x) and (x**2).sum() > 0 else float("nan")


def _pcts(values: pd.Series | list[float], name: str, scale: float = 1e3) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {f"{name}_p{p}": float("nan") for p in PERCENTILES} | {f"{name}_mean": float("nan")}
    out = {f"{name}_p{p}": float(np.percentile(arr, p)) * scale for p in PERCENTILES}
    out[f"{name}_mean"] = float(arr.mean()) * scale
    return out


def summarize(
    records: pd.DataFrame, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> dict[str, Any]:
    """One cell x repetition's records -> its summary row (latencies in ms)."""
    measured = records[~records["warmup"].astype(bool)]
    ok = measured[measured["status"] == "ok"]
    origin = _origin(ok)
    tokens = _tokens(ok)
    ttft = ok["first_token_s"].astype(float) - origin
    ttft_actual = ok["first_token_s"].astype(float) - ok["actual_send_s"].astype(float)
    e2e = ok["end_s"].astype(float) - origin
    many = tokens > 1
    tpot = (ok["end_s"][many].astype(float) - ok["first_token_s"][many].astype(float)) / (tokens[many] - 1)
    itl = [g for t, k in zip(ok["chunk_times_s"], ok["chunk_tokens"], strict=True) for g in itl_values(list(t), list(k))]
    window_s = float(ok["end_s"].max() - measured["actual_send_s"].min()) if len(ok) else float("nan")
    meets = pd.Series(True, index=ok.index)
    if slo_ttft_ms is not None:
        meets &= ttft * 1e3 <= slo_ttft_ms
    if slo_tpot_ms is not None:
        meets &= (((ok["end_s"] - ok["first_token_s"]) / (tokens - 1).clip(lower=1)) * 1e3 <= slo_tpot_ms) | ~many
    per_token = (e2e / tokens.clip(lower=1)).groupby(ok["adapter"].fillna("(base)")).mean()
    mismatch = ok["output_tokens"].notna() & (ok["output_tokens"] != ok["client_output_tokens"])
    summary: dict[str, Any] = {
        "requests": len(measured),
        "ok": len(ok),
        "errors": int((measured["status"] == "error").sum()),
        "refused": int((measured["status"] == "refused").sum()),
        "timeouts": int((measured["status"] == "timeout").sum()),
        "output_tokens": int(tokens.sum()),
        "token_count_mismatches": int(mismatch.sum()),
        "window_s": window_s,
        "output_tok_s": float(tokens.sum() / window_s) if window_s > 0 else float("nan"),
        "request_per_s": float(len(ok) / window_s) if window_s > 0 else float("nan"),
        "goodput_req_s": float(meets.sum() / window_s) if window_s > 0 else float("nan"),
        "adapters_seen": int(ok["adapter"].nunique()),
        "jain_fairness": jain_index([1.0 / v for v in per_token if v > 0]),
    }
    summary |= _pcts(ttft, "ttft_ms") | _pcts(ttft_actual, "ttft_actual_ms") | _pcts(e2e, "e2e_ms")
    summary |= _pcts(tpot, "tpot_ms") | _pcts(itl, "itl_ms")
    return summary


def per_adapter(records: pd.DataFrame) -> pd.DataFrame:
    """TTFT and E2E percentiles per adapter (measured, successful requests), sorted by traffic."""
    ok = records[~records["warmup"].astype(bool) & (records["status"] == "ok")].copy()
    ok["ttft_ms"] = (ok["first_token_s"] - _origin(ok)) * 1e3
    ok["e2e_ms"] = (ok["end_s"] - _origin(ok)) * 1e3
    ok["adapter"] = ok["adapter"].fillna("(base)")
    grouped = ok.groupby("adapter")
    table = grouped.size().rename("requests").to_frame()
    for col in ("ttft_ms", "e2e_ms"):
        for p in PERCENTILES:
            table[f"{col}_p{p}"] = grouped[col].quantile(p / 100)
    return table.sort_values("requests", ascending=False)
