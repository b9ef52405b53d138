"""report.html: one self-contained page per run directory (figures inlined as data URIs, no external
CSS, JS or images; readable offline), rebuilt from the files alone.

Sections: the correctness stamp (from verify.json, when the run was verified: `run --verify`); the
manifest; warnings; a summary table (one row per parameter group, repetitions
aggregated with 95% CIs); headline findings computed from the cells that exist; the figures (or why
one was skipped); the max_loras recommendation (measured best region and the working-set model);
this run beside the published study; what is not measured.
"""

from __future__ import annotations

import base64
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from lorascope.analysis.aggregate import PARAMS
from lorascope.analysis.figures import (
    FIGURES,
    RunData,
    _closed,
    _constant,
    _sweep_groups,
    draw,
    fmt,
    fmt_ci,
    groups,
    hardware,
    label,
    law_label,
    load_run,
    varying,
)

STUDY_SETUP = ("Llama-3.1-8B fp16 on one 80 GB GPU, vLLM >= 0.15 (OpenAI server), 1,000 rank-16 q/v adapters, "
               "128/128 tokens, one run per cell")


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _num(v: Any) -> str:
    x = _f(v)
    if not math.isfinite(x):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    return str(int(x)) if x.is_integer() else f"{x:g}"


def _mean_ci(row: pd.Series, metric: str) -> str:
    mean, ci = _f(row.get(metric)), _f(row.get(f"{metric}_ci95"))
    if not math.isfinite(mean):
        return "n/a"
    return fmt(mean) + (f" ± {fmt_ci(ci, mean)}" if math.isfinite(ci) else "")


def _where(row: pd.Series | dict, params: list[str]) -> str:
    return label(row, params)


# ---------------------------------------------------------------------------------------------------
# Sections.


def manifest_rows(manifest: dict[str, Any], data: RunData) -> list[tuple[str, str]]:
    engine = manifest.get("engine") or {}
    spec = manifest.get("spec") or {}
    host = manifest.get("host") or {}
    cells = data.cells
    models = sorted({str(m) for m in cells.get("model", pd.Series(dtype=str)).dropna()}) or [str(spec.get("model", "?"))]
    base = manifest.get("base_model")
    rows = [
        ("engine", f"{engine.get('name', '?')} {engine.get('version', '')}".strip()),
        ("model", ", ".join(models) + (f" (base: {base})" if base and str(base) not in models else "")),
        ("hardware", f"{hardware(manifest)}; {host.get('cpus', '?')} CPUs, {host.get('machine', '?')}, "
                     f"{host.get('system', '')}".strip(", ")),
        ("command", " ".join(str(c) for c in manifest.get("command") or [])),
        ("started", str(manifest.get("started") or "?")),
        ("finished", str(manifest.get("finished") or "not finished")),
        ("lorascope version", str(manifest.get("lorascope_version") or "?")),
        ("python", str(manifest.get("python") or "?")),
    ]
    if manifest.get("server_mode"):
        rows.append(("server mode", str(manifest["server_mode"])))
    known = {"engine", "spec", "host", "command", "started", "finished", "lorascope_version", "python",
             "server_mode", "warnings", "base_model"}
    for key in sorted(set(manifest) - known):
        value = manifest[key]
        rows.append((key, value if isinstance(value, str) else json.dumps(value, default=str)))
    rows.append(("cells", f"{len(cells)} cell runs in {len(data.agg)} parameter groups"))
    return rows


def summary_rows(data: RunData) -> tuple[list[str], list[list[str]]]:
    agg = data.agg
    if agg.empty:
        return [], []
    shown = [p for p in ("engine", "policy", "adapters", "traffic", "concurrency", "rate", "arrival", "max_loras",
                         "max_cpu_loras", "max_lora_rank", "input_len", "output_len", "slo_ttft_ms")
             if p in agg and agg[p].notna().any()]
    # Any other parameter that tells groups apart gets a column too (else two rows would look alike).
    shown += [p for p in PARAMS if p in agg and p not in shown and p != "base_model" and not _constant(agg, p)[0]]
    names = {"adapters": "N", "concurrency": "c", "traffic": "traffic", "input_len": "in", "output_len": "out",
             "max_cpu_loras": "max_cpu_loras", "slo_ttft_ms": "TTFT SLO (ms)", "rate": "rate (req/s)"}
    header = [names.get(p, p) for p in shown] + ["reps", "tok/s (± 95% CI)", "TTFT p50 (ms)", "TTFT p99 (ms)",
                                                 "TPOT p50 (ms)", "errors / refused / timeouts"]
    counts = data.cells.groupby("group")[[c for c in ("errors", "refused", "timeouts") if c in data.cells]].sum()
    sort = [p for p in ("engine", "policy", "traffic", "concurrency", "adapters", "max_loras") if p in agg]
    rows = []
    for _, r in agg.sort_values(sort, na_position="first", kind="stable").iterrows():
        cells = [law_label(r[p]) if p == "traffic" else _num(r[p]) for p in shown]
        bad = counts.loc[r["group"]] if r["group"] in counts.index else pd.Series(dtype=float)
        errors = " / ".join(_num(bad.get(c, float("nan"))) or "?" for c in ("errors", "refused", "timeouts"))
        rows.append([*cells, str(int(r["n"])), _mean_ci(r, "output_tok_s"), _mean_ci(r, "ttft_ms_p50"),
                     _mean_ci(r, "ttft_ms_p99"), _mean_ci(r, "tpot_ms_p50"), errors])
    return header, rows


def findings(data: RunData) -> list[str]:
    """Headline sentences, each computed from cells that exist (none is said about a missing cell)."""
    out: list[str] = []
    agg = _closed(data.agg)
    agg = agg[agg["output_tok_s"].notna()] if not agg.empty else agg
    if agg.empty:
        return out
    # Skewed vs uniform at the same setting and N.
    pairs = []
    for first, rows in groups(agg, varying(agg, exclude=("traffic",))):
        uni = rows[rows["traffic"].astype(str) == "uniform"]
        if uni.empty or float(first["adapters"]) <= 1:
            continue
        for _, sk in rows[rows["traffic"].astype(str) != "uniform"].iterrows():
            pairs.append((float(first["adapters"]), first, uni.iloc[0], sk))
    for _, first, uni, sk in sorted(pairs, key=lambda p: -p[0])[:3]:
        ratio = _f(sk["output_tok_s"]) / _f(uni["output_tok_s"])
        out.append(f"At c={_num(first['concurrency'])}, N={_num(first['adapters'])} and max_loras "
                   f"{_num(first['max_loras'])}, {law_label(sk['traffic'])} gave {_mean_ci(sk, 'output_tok_s')} tok/s "
                   f"vs uniform {_mean_ci(uni, 'output_tok_s')} ({ratio:.2f}x).")
    # Throughput over N with uniform traffic.
    uni = agg[agg["traffic"].astype(str) == "uniform"]
    for first, rows in groups(uni, varying(uni, exclude=("adapters",))):
        if rows["adapters"].nunique() < 2:
            continue
        rows = rows.sort_values("adapters")
        lo, hi = rows.iloc[0], rows.iloc[-1]
        change = _f(hi["output_tok_s"]) / _f(lo["output_tok_s"]) - 1
        out.append(f"With uniform traffic at c={_num(first['concurrency'])} and max_loras {_num(first['max_loras'])}, "
                   f"throughput went from {_mean_ci(lo, 'output_tok_s')} tok/s at N={_num(lo['adapters'])} to "
                   f"{_mean_ci(hi, 'output_tok_s')} at N={_num(hi['adapters'])} ({change:+.0%}).")
    # max_loras sweeps: the tail and the throughput at both ends.
    for rows in _sweep_groups(agg, "max_loras", ())[:3]:
        rows = rows.sort_values("max_loras")
        lo, hi = rows.iloc[0], rows.iloc[-1]
        where = _where(lo, ["adapters", "traffic", "concurrency"] + [p for p in ("policy",) if p in rows])
        out.append(f"p99 TTFT at max_loras {_num(lo['max_loras'])} was {_mean_ci(lo, 'ttft_ms_p99')} ms vs "
                   f"{_mean_ci(hi, 'ttft_ms_p99')} ms at {_num(hi['max_loras'])}; throughput "
                   f"{_mean_ci(lo, 'output_tok_s')} vs {_mean_ci(hi, 'output_tok_s')} tok/s ({where}).")
    # Policies.
    if "policy" in agg and {"fair", "vllm"} <= set(agg["policy"].astype(str)):
        for first, rows in groups(agg, varying(agg, exclude=("policy",))):
            pol = {str(p): r for p, r in zip(rows["policy"], (r for _, r in rows.iterrows()))}
            if {"fair", "vllm"} <= set(pol):
                where = _where(first, ["adapters", "traffic", "concurrency", "max_loras"])
                out.append(f"At {where}, the fair policy gave {_mean_ci(pol['fair'], 'output_tok_s')} tok/s and p99 "
                           f"TTFT {_mean_ci(pol['fair'], 'ttft_ms_p99')} ms; vllm "
                           f"{_mean_ci(pol['vllm'], 'output_tok_s')} tok/s and "
                           f"{_mean_ci(pol['vllm'], 'ttft_ms_p99')} ms.")
                if sum("policy" in s for s in out) >= 3:
                    break
    # Repetitions: how much a single run can be trusted.
    reps = agg[(agg["n"] > 1) & agg["output_tok_s_ci95"].notna()] if "output_tok_s_ci95" in agg else agg.iloc[0:0]
    if not reps.empty:
        rel = (reps["output_tok_s_ci95"] / reps["output_tok_s"]).astype(float)
        worst = reps.loc[rel.idxmax()]
        out.append(f"{len(reps)} parameter group(s) ran more than once; the widest 95% CI of throughput is "
                   f"{_mean_ci(worst, 'output_tok_s')} tok/s (n={int(worst['n'])}, "
                   f"{_where(worst, ['adapters', 'traffic', 'concurrency', 'max_loras'])}, cells "
                   f"{worst['cell_ids']}): differences between single runs smaller than that are not evidence.")
    # Working set.
    if {"predicted_distinct", "active_adapters_mean"} <= set(agg.columns):
        free = agg[(agg["max_loras"].astype(float) >= agg["predicted_p90_distinct"].astype(float))
                   & agg["active_adapters_mean"].notna() & (agg["predicted_distinct"].astype(float) > 1)]
        if not free.empty:
            ratio = (free["active_adapters_mean"] / free["predicted_distinct"]).astype(float)
            out.append(f"Where max_loras did not cap it ({len(free)} group(s)), the measured mean of active adapters "
                       f"per step was {ratio.min():.0%}–{ratio.max():.0%} of the working-set model's prediction.")
    lag = data.cells["loop_lag_p99_ms"].astype(float) if "loop_lag_p99_ms" in data.cells else pd.Series(dtype=float)
    if not lag.dropna().empty and lag.max() > 10:
        out.append(f"The load generator's event loop lagged up to {lag.max():.0f} ms at p99 (cell "
                   f"{data.cells.loc[lag.idxmax(), 'cell_id']}): latencies of the order of that lag include "
                   "the client's own delay.")
    return out


def recommendations(data: RunData) -> tuple[list[dict[str, Any]], str | None]:
    """Per (N, law, c) group with a max_loras sweep: the measured best region and tune's model."""
    agg = _closed(data.agg)
    agg = agg[agg["output_tok_s"].notna() & agg["ttft_ms_p99"].notna()] if not agg.empty else agg
    sweeps = _sweep_groups(agg, "max_loras", ())
    if not sweeps:
        return [], "The run has no setting measured at two or more max_loras values, so there is no measured best region."
    try:
        from lorascope.analysis.tune import best_region, recommend
    except ImportError as exc:  # the tune model is optional for the rest of the report
        return [], f"The tune model is not available ({exc})."
    out = []
    for rows in sweeps:
        first = rows.iloc[0]
        cells = data.cells[data.cells["group"].isin(rows["group"])]
        measured = [{"max_loras": r["max_loras"], "output_tok_s": r["output_tok_s"], "ttft_ms_p99": r["ttft_ms_p99"]}
                    for _, r in cells.iterrows() if math.isfinite(_f(r["output_tok_s"])) and math.isfinite(_f(r["ttft_ms_p99"]))]
        slo = _f(first.get("slo_ttft_ms"))
        slo = slo if math.isfinite(slo) else None
        item: dict[str, Any] = {
            "where": _where(first, ["adapters", "traffic", "concurrency", "input_len", "output_len"]
                            + [p for p in ("policy", "engine") if p in rows and str(first[p]) != "embedded"]),
            "measured": ", ".join(_num(v) for v in sorted(rows["max_loras"].astype(float).unique())),
            "best": None, "model": None, "explanation": None, "error": None, "slo": slo is not None,
        }
        try:
            region = best_region(measured, slo_ttft_ms=slo)
            item["best"] = ", ".join(str(v) for v in region) if region else (
                "none: no measured setting is near-best on both throughput and p99 TTFT")
        except ValueError as exc:
            item["error"] = f"best region: {exc}"
        policy = str(first.get("policy", "vllm"))
        try:
            rec = recommend(int(_f(first["adapters"])), str(first["traffic"]), int(_f(first["concurrency"])),
                            slo_ttft_ms=slo, policy=policy if policy in ("vllm", "fair") else "vllm")
            item["model"] = (f"max_loras {rec.max_loras}, max_cpu_loras {rec.max_cpu_loras} "
                             f"(expected {rec.expected_distinct:.1f} distinct adapters per step, p90 {rec.p90_distinct})")
            item["explanation"] = rec.explanation
        except (ValueError, TypeError) as exc:
            item["error"] = ((item["error"] + "; ") if item["error"] else "") + f"model: {exc}"
        out.append(item)
    return out, None


def _study_frame() -> pd.DataFrame:
    try:
        text = resources.files("lorascope.data").joinpath("study_cells.csv").read_text()
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        import lorascope

        text = (Path(lorascope.__file__).parent / "data" / "study_cells.csv").read_text()
    from io import StringIO

    return pd.read_csv(StringIO(text))


def _study_traffic(traffic: str) -> str:
    """The run's law name -> the study file's: 'zipf:1.5' -> 'zipf_s1.5'."""
    name, _, rest = str(traffic).partition(":")
    return f"zipf_s{rest}" if name == "zipf" and rest else str(traffic)


def study_rows(data: RunData) -> tuple[list[str], list[list[str]]]:
    agg = _closed(data.agg)
    if agg.empty:
        return [], []
    study = _study_frame()
    header = ["N", "traffic", "c", "max_loras", "reps", "this run: tok/s", "this run: p99 TTFT (ms)",
              "study: tok/s", "study: p99 TTFT (ms)", "study figure", "ratio tok/s (run / study)"]
    rows = []
    for _, r in agg.sort_values(["traffic", "concurrency", "max_loras", "adapters"]).iterrows():
        match = study[(study["traffic"] == _study_traffic(r["traffic"]))
                      & (study["concurrency"].astype(float) == _f(r["concurrency"]))
                      & (study["max_loras"].astype(float) == _f(r["max_loras"]))
                      & (study["num_adapters_N"].astype(float) == _f(r["adapters"]))]
        for _, s in match.iterrows():
            ratio = _f(r["output_tok_s"]) / _f(s["throughput_tok_s"])
            rows.append([_num(r["adapters"]), law_label(r["traffic"]), _num(r["concurrency"]), _num(r["max_loras"]),
                         str(int(r["n"])), _mean_ci(r, "output_tok_s"), _mean_ci(r, "ttft_ms_p99"),
                         fmt(_f(s["throughput_tok_s"])),
                         fmt(_f(s["p99_ttft_ms"])) if math.isfinite(_f(s["p99_ttft_ms"])) else "not published",
                         str(s["source_figure"]), f"{ratio:.2f}" if math.isfinite(ratio) else "n/a"])
    return header, rows


def not_measured(data: RunData) -> list[str]:
    models = ", ".join(sorted({str(m) for m in data.cells.get("model", pd.Series(dtype=str)).dropna()})) or "?"
    modes = ", ".join(sorted({str(m) for m in data.cells.get("warmup_mode", pd.Series(dtype=str)).dropna()})) or "?"
    notes = [
        f"Numbers hold for this run's hardware ({hardware(data.manifest)}), engine and model ({models}) only; other "
        "models and hardware keep at most the shape of the effects.",
        f"Warm-up requests (warm-up mode: {modes}) are excluded from every statistic: cold-start loads of an adapter "
        "are not in these latencies.",
        "Each cell's window ends with the last measured request; the drain is excluded. Closed-loop cells hide "
        "queueing that open-loop arrivals would show (coordinated omission).",
        "A 95% CI needs repetitions: a group with one run shows no interval, and its differences to other single runs "
        "may be noise.",
    ]
    if data.requests.empty:
        notes.append("No request records: the TTFT distribution and per-adapter figures could not be drawn.")
    if data.server_metrics.empty:
        notes.append("No server metrics: active adapters per step and resident memory were not observed.")
    src = set()
    for v in data.cells.get("mem_source", pd.Series(dtype=str)).dropna():
        src |= set(str(v).split(","))
    if "estimated" in src or not src:
        notes.append("Memory is (partly) estimated from the configuration, not measured on the device.")
    if "adapters" in data.cells and not (data.cells["adapters"].astype(float) == 0).any():
        notes.append("No baseline without LoRA (N=0) was run: the cost of LoRA itself is not isolated.")
    return notes


def verify_stamp(run_dir: Path) -> dict[str, Any] | None:
    """The correctness stamp from `verify.json` (`lorascope run --verify`), or None when the run has none.

    Read as data (this package never imports the engine side): the verdict, its one-line summary, and
    one row per model with what its answers were under each setting.
    """
    path = Path(run_dir) / "verify.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        return {"verdict": "error", "summary": f"verify.json is unreadable ({exc})", "settings": [], "rows": [],
                "findings": [], "engine": "?"}
    settings = [str(s.get("name")) for s in data.get("settings") or []]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in data.get("outcomes") or []:
        by.setdefault((str(o.get("model")), str(o.get("setting"))), []).append(o)
    models = sorted({m for m, _ in by}, key=lambda m: (m != "(base)", m))
    rows = [[m, *[_verify_cell(by.get((m, s), [])) for s in settings]] for m in models]
    findings = [o for o in data.get("outcomes") or [] if o.get("status") != "pass"][:40]
    for a in data.get("ambiguous") or []:
        findings.append({"setting": "reference", "model": ", ".join(a.get("models", [])), "prompt": a.get("prompt"),
                         "status": "ambiguous", "got": [], "detail": "these references coincide for this prompt"})
    return {"verdict": str(data.get("verdict", "error")), "summary": str(data.get("summary", "")), "settings": settings,
            "rows": rows, "findings": findings,
            "engine": f"{data.get('engine', '?')} {data.get('engine_version', '')}".strip()}


def _verify_cell(outcomes: list[dict[str, Any]]) -> str:
    ok = sum(o.get("status") == "pass" for o in outcomes)
    parts = []
    for status in ("contaminated_base", "wrong_adapter", "wrong_output", "error", "drift"):
        found = [o for o in outcomes if o.get("status") == status]
        if found:
            got = sorted({"/".join(o.get("got") or []) for o in found} - {""})
            parts.append(f"{len(found)} {status.replace('_', ' ')}" + (f" ({', '.join(got)})" if got else ""))
    return "; ".join([*parts, f"ok {ok}/{len(outcomes)}"])


# ---------------------------------------------------------------------------------------------------
# The page.

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
table.kv td:first-child { font-weight: 600; text-align: left; white-space: nowrap; }
table.kv td { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; margin-top: .3em; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5em 1em; }
.skip { color: #775; font-style: italic; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.muted { color: #666; font-size: .9em; }
.stamp { border: 2px solid; padding: .6em 1em; margin: 1em 0; }
.stamp.pass { border-color: #2a8a2a; background: #eef8ee; } .stamp.fail, .stamp.error { border-color: #c02020; background: #fdeeee; }
.stamp b.v { font-size: 1.2em; }
</style></head>
<body>
<h1>{{ title }}</h1>
{% if verify %}<div class="stamp {{ verify.verdict }}" id="verify"><b class="v">{% if verify.verdict == "pass" %}Correctness: VERIFIED
{% elif verify.verdict == "fail" %}Correctness: FAILED{% else %}Correctness: NOT VERIFIED{% endif %}</b>
({{ verify.engine }}; <code>lorascope verify</code>: HF transformers + PEFT references, mixed batches): {{ verify.summary }}
{% if verify.rows %}<details{% if verify.verdict != "pass" %} open{% endif %}><summary>Per model and setting (verify.json)</summary>
<table><tr><th class="l">model</th>{% for s in verify.settings %}<th>{{ s }}</th>{% endfor %}</tr>
{% for row in verify.rows %}<tr>{% for c in row %}<td class="l">{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if verify.findings %}<table><tr><th class="l">setting</th><th class="l">model</th><th>prompt</th><th class="l">finding</th>
<th class="l">equals / closest</th><th class="l">detail</th></tr>
{% for f in verify.findings %}<tr><td class="l">{{ f.setting }}</td><td class="l">{{ f.model }}</td><td>{{ f.prompt }}</td>
<td class="l">{{ f.status }}</td><td class="l">{{ (f.got or []) | join(", ") }}</td><td class="l">{{ f.detail }}</td></tr>
{% endfor %}</table>{% endif %}</details>{% endif %}</div>
{% else %}<p class="muted">Correctness not verified in this run (<code>lorascope run --verify</code> adds the stamp).</p>{% endif %}
<p class="muted">Generated by lorascope {{ version }} from the files of <code>{{ run_dir }}</code>; rebuild with
<code>lorascope report {{ run_dir }}</code>.</p>

<h2>Run</h2>
<table class="kv">
{% for k, v in manifest_rows %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>
{% endfor %}</table>
<details><summary>Full spec</summary><pre>{{ spec_json }}</pre></details>

{% if warnings %}<h2>Warnings</h2>
<div class="warn"><ul>{% for w in warnings %}<li>{{ w }}</li>{% endfor %}</ul></div>{% endif %}

<h2>Summary</h2>
{% if summary_rows %}
<p class="muted">One row per parameter group (repetitions, possibly from several sweeps, aggregated): mean, and
± the 95% confidence half-width t(0.975, n−1)·s/√n where n &gt; 1. Errors count every repetition.</p>
<table><tr>{% for h in summary_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in summary_rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p>No finished cell in this run.</p>{% endif %}

<h2>Headline findings</h2>
{% if findings %}<ul>{% for f in findings %}<li>{{ f }}</li>{% endfor %}</ul>
{% else %}<p>The run has too few cells for a comparison.</p>{% endif %}

<h2>Figures</h2>
{% for f in figures %}
{% if f.uri %}<figure id="{{ f.name }}"><img src="{{ f.uri }}" alt="{{ f.title }}">
<figcaption><b>{{ f.name }}.png</b> — {{ f.caption }}</figcaption></figure>
{% else %}<p class="skip" id="{{ f.name }}">{{ f.name }}.png was skipped: {{ f.reason }}.</p>{% endif %}
{% endfor %}

<h2>Recommendation: max_loras</h2>
{% if rec_note %}<p>{{ rec_note }}</p>{% endif %}
{% for r in recs %}
<h3>{{ r.where }}</h3>
<ul>
<li>Measured max_loras values: {{ r.measured }}.</li>
{% if r.best is not none %}<li>Best measured (throughput within 10% of the best, p99 TTFT
{% if r.slo %}within the SLO{% else %}within 2× of the lowest{% endif %}): <b>{{ r.best }}</b>.</li>{% endif %}
{% if r.model %}<li>Working-set model (lorascope tune): <b>{{ r.model }}</b>.<br>{{ r.explanation }}</li>{% endif %}
{% if r.error %}<li class="skip">{{ r.error }}</li>{% endif %}
</ul>
{% endfor %}

<h2>This run beside the study</h2>
<p>The study "Multi-LoRA at scale" (May 2026) measured {{ study_setup }}. This run used {{ this_setup }}.
<b>The hardware and engine differ</b> (and so, likely, the model and lengths): compare the shape of the effects,
not the absolute numbers.</p>
{% if study_rows %}
<table><tr>{% for h in study_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in study_rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p>No cell of this run matches a study cell (same traffic, concurrency, max_loras and N).</p>{% endif %}

<h2>What is not measured</h2>
<ul>{% for n in not_measured %}<li>{{ n }}</li>{% endfor %}</ul>
</body></html>
"""


def _title(manifest: dict[str, Any], run_dir: Path) -> str:
    spec = manifest.get("spec") or {}
    name, preset = spec.get("name"), spec.get("preset")
    if name and preset and name != preset:
        return f"lorascope report: {name} (preset {preset})"
    if name or preset:
        return f"lorascope report: {name or preset}"
    return f"lorascope report: {run_dir.resolve().name}"


def _uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_report(run_dir: Path) -> Path:
    """Draw every figure into run_dir/figures and write run_dir/report.html; returns its path."""
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    info = draw(data)
    manifest = data.manifest
    figures = [{"name": name, "uri": _uri(i["path"]) if i["path"] else None, "title": i["title"] or name,
                "caption": i["caption"], "reason": i["reason"]} for name, i in info.items()]
    recs, rec_note = recommendations(data)
    summary_header, summary = summary_rows(data)
    study_header, study = study_rows(data)
    models = ", ".join(sorted({str(m) for m in data.cells.get("model", pd.Series(dtype=str)).dropna()})) or "?"
    engines = ", ".join(sorted({str(m) for m in data.cells.get("engine", pd.Series(dtype=str)).dropna()})) or str(
        (manifest.get("engine") or {}).get("name", "?"))
    warnings = manifest.get("warnings") or []
    if isinstance(warnings, str):
        warnings = [warnings]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(TEMPLATE).render(
        title=_title(manifest, run_dir), version=manifest.get("lorascope_version", "?"), run_dir=str(run_dir),
        manifest_rows=manifest_rows(manifest, data),
        spec_json=json.dumps(manifest.get("spec") or {}, indent=2, default=str, sort_keys=True),
        warnings=[str(w) for w in warnings], summary_header=summary_header, summary_rows=summary,
        findings=findings(data), figures=figures, recs=recs, rec_note=rec_note,
        study_setup=STUDY_SETUP, this_setup=f"{models} on {hardware(manifest)} with the {engines} engine",
        study_header=study_header, study_rows=study, not_measured=not_measured(data), verify=verify_stamp(run_dir),
    )
    path = run_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["FIGURES", "build_report", "findings", "recommendations", "study_rows", "summary_rows", "verify_stamp"]
