"""Records survive the disk round trip and resume; summaries compute the documented definitions
on hand-made records whose right answers are worked out below."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from lorascope.results.records import RequestRecord, finished_cells, read_records, records_frame, write_cell
from lorascope.results.summary import itl_values, jain_index, per_adapter, summarize


def rec(i: int, adapter: str | None, send: float, first: float, end: float, tokens: int, **kw) -> RequestRecord:
    chunks = kw.pop("chunks", None) or [(first + j * (end - first) / max(1, tokens - 1), 1) for j in range(tokens)]
    return RequestRecord(
        cell_id="c0", repetition=0, index=i, adapter=adapter, warmup=kw.pop("warmup", False),
        intended_send_s=kw.pop("intended", None), actual_send_s=send, first_token_s=first, end_s=end,
        prompt_tokens=8, output_tokens=kw.pop("server_tokens", tokens), client_prompt_tokens=8,
        client_output_tokens=tokens, chunk_times_s=[t for t, _ in chunks], chunk_tokens=[k for _, k in chunks], **kw,
    )


def test_write_read_resume(tmp_path: Path) -> None:
    records = [rec(0, "a", 0.0, 0.1, 1.0, 10), rec(1, None, 0.2, 0.4, 1.5, 5)]
    write_cell(tmp_path, "c0", 0, records)
    write_cell(tmp_path, "c0", 1, records)
    assert finished_cells(tmp_path) == {("c0", 0), ("c0", 1)}
    with pytest.raises(FileExistsError, match="already finished"):
        write_cell(tmp_path, "c0", 0, records)
    back = read_records(tmp_path)
    assert len(back) == 4 and list(back["chunk_tokens"][0]) == [1] * 10
    assert back["adapter"].isna().sum() == 2
    assert pd.read_parquet(tmp_path / "requests.parquet").shape[0] == 4  # one dataset for pandas
    assert not list((tmp_path / "requests.parquet").glob("*.tmp"))


def test_bad_status_is_refused() -> None:
    with pytest.raises(ValueError, match="status"):
        RequestRecord("c", 0, 0, None, False, None, 0.0, status="weird")


def test_itl_splits_multi_token_chunks() -> None:
    # chunks at 1.0 (1 token), 1.3 (3 tokens), 1.5 (1 token): gaps 0.3/3 x3 then 0.2
    assert itl_values([1.0, 1.3, 1.5], [1, 3, 1]) == pytest.approx([0.1, 0.1, 0.1, 0.2])
    assert sum(itl_values([1.0, 1.3, 1.5], [1, 3, 1])) == pytest.approx(0.5)  # = end - first token


def test_jain_index() -> None:
    assert jain_index([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert math.isnan(jain_index([]))


def test_summary_definitions() -> None:
    records = records_frame([
        rec(0, "a", 0.0, 0.5, 2.5, 5, warmup=True),  # excluded everywhere
        rec(1, "a", 1.0, 1.2, 2.0, 5),  # ttft 0.2, e2e 1.0, tpot 0.8/4 = 0.2
        rec(2, "b", 1.0, 1.4, 3.0, 9, intended=0.9),  # ttft 0.5 from intended, 0.4 from actual; tpot 0.2
        rec(3, None, 2.0, 2.1, 2.1, 1),  # one token: no tpot
        rec(4, "b", 2.5, 2.6, 2.6, 1, status="error", error="boom"),
        rec(5, "a", 2.5, 3.0, 4.0, 3, server_tokens=4),  # usage says 4 tokens: a mismatch; tpot 1.0/3
    ])
    s = summarize(records, slo_ttft_ms=300)
    assert (s["requests"], s["ok"], s["errors"]) == (5, 4, 1)
    assert s["output_tokens"] == 5 + 9 + 1 + 4  # server usage wins over the client count
    assert s["token_count_mismatches"] == 1
    assert s["window_s"] == pytest.approx(4.0 - 1.0)  # first measured send 1.0 -> last end 4.0
    assert s["output_tok_s"] == pytest.approx(19 / 3.0)
    assert s["ttft_ms_p50"] == pytest.approx(350.0)  # ttfts 200, 500, 100, 500 -> median 350
    assert s["ttft_actual_ms_mean"] == pytest.approx((200 + 400 + 100 + 500) / 4)
    assert s["tpot_ms_mean"] == pytest.approx((200 + 200 + 1000 / 3) / 3)
    assert s["goodput_req_s"] == pytest.approx(2 / 3.0)  # ttft <= 300 ms: requests 1 and 3
    assert s["adapters_seen"] == 2  # a and b; the base model is not an adapter
    assert 0 < s["jain_fairness"] <= 1


def test_per_adapter_table() -> None:
    records = records_frame([rec(i, "hot" if i % 4 else "cold", i, i + 0.1 * (1 + i % 4), i + 1, 4) for i in range(12)])
    table = per_adapter(records)
    assert list(table.index) == ["hot", "cold"]
    assert table.loc["hot", "requests"] == 9 and table.loc["cold", "requests"] == 3
    assert table.loc["cold", "ttft_ms_p50"] == pytest.approx(100.0)
