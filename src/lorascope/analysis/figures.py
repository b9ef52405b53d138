"""The figures of a run directory (PNG, matplotlib's Agg canvas, no pyplot state).

Every figure is a function `fn(data: RunData) -> Path | None`: it draws what the run has (partial
grids included) and returns the written file, or None when the run lacks the cells it needs; it
then records why in `data.info[name]["reason"]`. Titles state the workload; points measured more
than once carry 95% confidence intervals (analysis.aggregate). Each PNG carries its title in its
metadata ("Title"), so tests and tools can read it back.

`draw_all(run_dir)` writes every figure to `run_dir/figures/` and returns the written paths.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from lorascope.analysis.aggregate import PARAMS, aggregate, group_ids, read_cells

# Parameters that tell lines/panels apart. warmup_mode follows N under "auto" and base_model follows
# model, so they would only cut one workload's line into pieces.
SERIES_PARAMS = tuple(p for p in PARAMS if p not in ("warmup_mode", "base_model"))
DPI = 110
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22")
MEM_PARTS = (("mem_weights_bytes", "base weights", "#4c72b0"), ("mem_kv_cache_bytes", "KV cache", "#55a868"),
             ("mem_adapter_slots_bytes", "adapter slots (device)", "#c44e52"),
             ("mem_host_tier_bytes", "host tier (adapters)", "#dd8452"))


# ---------------------------------------------------------------------------------------------------
# The run's data.


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any]
    cells: pd.DataFrame  # cells.csv, plus `group` (its parameter group)
    agg: pd.DataFrame  # analysis.aggregate over repetitions
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # per figure: title, caption, reason
    _requests: pd.DataFrame | None = None
    _metrics: pd.DataFrame | None = None

    @property
    def requests(self) -> pd.DataFrame:
        """Measured (non-warm-up) request records, with `ttft_ms` for the successful ones."""
        if self._requests is None:
            from lorascope.results.records import read_records

            frame = read_records(self.run_dir)
            if not frame.empty:
                frame = frame[~frame["warmup"].astype(bool)].copy()
                origin = pd.to_numeric(frame["intended_send_s"], errors="coerce").fillna(frame["actual_send_s"])
                frame["ttft_ms"] = (pd.to_numeric(frame["first_token_s"], errors="coerce") - origin) * 1e3
            self._requests = frame
        return self._requests

    @property
    def server_metrics(self) -> pd.DataFrame:
        if self._metrics is None:
            folder = self.run_dir / "server_metrics.parquet"
            files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
            self._metrics = (pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files
                             else pd.DataFrame(columns=["cell_id", "repetition", "t_s", "metric", "labels", "value"]))
        return self._metrics

    def runs_of(self, group: int) -> list[tuple[str, int]]:
        """(cell_id, repetition) of every row of a parameter group."""
        rows = self.cells[self.cells["group"] == group]
        return list(zip(rows["cell_id"].astype(str), rows["repetition"].astype(int)))


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    cells = read_cells(run_dir)
    if not cells.empty:
        if "traffic" in cells:
            cells["traffic"] = cells["traffic"].fillna("").astype(str)
        cells["group"] = group_ids(cells)
        agg = aggregate(cells.drop(columns="group"))
    else:
        cells["group"] = pd.Series(dtype=int)
        agg = aggregate(cells.drop(columns="group"))
    return RunData(run_dir, manifest, cells, agg)


# ---------------------------------------------------------------------------------------------------
# Words: workloads, labels, numbers.


def law_label(traffic: object) -> str:
    """'uniform' -> 'uniform', 'zipf:1.5' -> 'Zipf s=1.5', 'power:0.5' -> 'power a=0.5'."""
    text = str(traffic)
    name, _, rest = text.partition(":")
    if name == "zipf" and rest:
        return f"Zipf s={rest}"
    if name == "power" and rest:
        return f"power a={rest}"
    if name == "hotset" and rest:
        return f"hot set {rest}"
    return text


def _is_set(v: object) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""


def _num(v: object) -> str:
    if not _is_set(v):
        return "?"
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() else f"{f:g}"


def fmt(v: float, digits: int = 3) -> str:
    """A number for a label: 1,234 for big ones, 3 significant digits for small ones."""
    if v is None or not math.isfinite(v):
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def fmt_ci(half: float, mean: float) -> str:
    """A CI half-width beside its mean: '0' when it is rounding noise (identical repetitions)."""
    if math.isfinite(half) and math.isfinite(mean) and abs(half) <= 1e-9 * max(abs(mean), 1e-300):
        return "0"
    return fmt(half)


def hardware(manifest: dict[str, Any]) -> str:
    host = manifest.get("host") or {}
    gpu = host.get("gpu")
    if gpu:
        count = host.get("gpu_count")
        return f"{count}x {gpu}" if count and int(count) > 1 else str(gpu)
    return "CPU"


def _param_phrase(p: str, v: object, row: pd.Series | dict | None = None) -> str | None:
    """One parameter as words (None when it says nothing, e.g. an unset optional knob)."""
    if p == "traffic":
        label = law_label(v)
        return "uniform traffic" if label == "uniform" else f"{label} traffic"
    if not _is_set(v):
        return None
    pattern = {
        "adapters": "N={}", "concurrency": "c={}", "rate": "{} req/s", "arrival": "{} arrivals",
        "max_loras": "max_loras {}", "max_cpu_loras": "max_cpu_loras {}", "max_lora_rank": "max_lora_rank {}",
        "rank": "rank {}", "policy": "{} policy", "engine": "{} engine", "model": "{}", "input_len": "in {}",
        "output_len": "out {}", "slo_ttft_ms": "TTFT SLO {} ms", "slo_tpot_ms": "TPOT SLO {} ms",
    }.get(p, p + " {}")
    return pattern.format(_num(v))


def _constant(df: pd.DataFrame, p: str) -> tuple[bool, object]:
    if p not in df or df.empty:
        return False, None
    values = df[p].astype(object).where(df[p].notna(), None).astype(str).unique()
    return len(values) == 1, df[p].iloc[0]


def workload(df: pd.DataFrame, manifest: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """The parameters shared by every row of df, as the study would name them: e.g. 'Uniform traffic,
    max_loras 32, 128/64 tokens, tiny on CPU (embedded engine, vllm policy)'. Skips `skip` and every
    parameter that varies (legends and axes name those)."""
    parts: list[str] = []
    for p in ("traffic", "adapters", "concurrency", "rate", "arrival", "max_loras", "max_cpu_loras", "rank",
              "max_lora_rank", "slo_ttft_ms", "slo_tpot_ms"):
        if p in skip:
            continue
        same, v = _constant(df, p)
        if same and (phrase := _param_phrase(p, v)):
            parts.append(phrase)
    same_in, vin = _constant(df, "input_len")
    same_out, vout = _constant(df, "output_len")
    if same_in and same_out:
        parts.append(f"{vin}/{vout} tokens")
    same_m, model = _constant(df, "model")
    parts.append(f"{model if same_m else 'several models'} on {hardware(manifest)}")
    same_e, engine = _constant(df, "engine")
    same_p, policy = _constant(df, "policy")
    tail = []
    if same_e and "engine" not in skip:
        tail.append(f"{engine} engine" if engine == "embedded" else str(engine))
    if same_p and "policy" not in skip and str(policy) != str(engine):
        tail.append(f"{policy} policy")
    text = ", ".join(parts)
    if tail:
        text += f" ({', '.join(tail)})"
    first = text.split(",", 1)[0].split(" ", 1)[0]
    return text if "=" in first else text[:1].upper() + text[1:]


def varying(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    if df.empty:
        return []
    return [p for p in SERIES_PARAMS if p in df and p not in exclude and not _constant(df, p)[0]]


def label(row: pd.Series | dict, params: list[str]) -> str:
    return ", ".join(x for p in params if (x := _param_phrase(p, row[p])) is not None) or "all cells"


def groups(df: pd.DataFrame, params: list[str]) -> Iterator[tuple[pd.Series, pd.DataFrame]]:
    """Split df by the values of params (NaN is a value), in sorted order; yields (first row, rows)."""
    if df.empty:
        return
    if not params:
        if not df.empty:
            yield df.iloc[0], df
        return
    key = df[params].astype(object).where(df[params].notna(), "").astype(str).apply("\x1f".join, axis=1)
    order = df.sort_values(params, na_position="first", kind="stable").index
    for k in dict.fromkeys(key.loc[order]):
        rows = df[key == k]
        yield rows.iloc[0], rows


def _title(fig: Figure, what: str, wl: str) -> str:
    title = f"{what}\n" + "\n".join(textwrap.wrap(wl, 95))
    fig.suptitle(title, fontsize=11)
    return title


def _ci(rows: pd.DataFrame, metric: str) -> np.ndarray:
    col = f"{metric}_ci95"
    return rows[col].to_numpy(dtype=float) if col in rows else np.full(len(rows), np.nan)


def _line(ax, rows: pd.DataFrame, x: str, y: str, log_y: bool = False, **style: Any) -> None:
    """A line through the group means, with 95% CI error bars where a point has repetitions (each such
    point says its n and half-width, since the axis limits may cut a wide interval)."""
    rows = rows.sort_values(x)
    xs, ys, ci = rows[x].to_numpy(dtype=float), rows[y].to_numpy(dtype=float), _ci(rows, y)
    ns = rows[f"{y}_n"].to_numpy(dtype=float) if f"{y}_n" in rows else np.ones(len(rows))
    ok = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & ((ys > 0) if log_y else True)
    (handle,) = ax.plot(xs[ok], ys[ok], marker="o", markersize=5, **style)
    has = ok & np.isfinite(ci)
    if has.any():
        low = np.minimum(ci[has], ys[has] * 0.999) if log_y else ci[has]
        ax.errorbar(xs[has], ys[has], yerr=[low, ci[has]], fmt="none", ecolor=handle.get_color(), capsize=4,
                    elinewidth=1.2)
        for xv, yv, cv, nv in zip(xs[has], ys[has], ci[has], ns[has]):
            ax.annotate(f"n={int(nv)}, ±{fmt_ci(cv, yv)}", (xv, yv), textcoords="offset points", xytext=(6, 6),
                        fontsize=7, color=handle.get_color())


def _limit_y(ax, rows: list[pd.DataFrame], y: str, log: bool = False) -> None:
    """y limits from the points themselves: a wide CI (two repetitions: t = 12.7) runs off the axis
    instead of flattening every line; its half-width is printed beside the point."""
    vals = np.concatenate([r[y].to_numpy(dtype=float) for r in rows]) if rows else np.array([])
    vals = vals[np.isfinite(vals) & ((vals > 0) if log else True)]
    if vals.size == 0:
        return
    if log:
        ax.set_ylim(vals.min() / 2.5, vals.max() * 2.5)
        _plain_log(ax.yaxis)
    else:
        ax.set_ylim(0, vals.max() * 1.3)


def _plain_log(axis) -> None:
    """Plain numbers (50, 200, 1,000) on a log axis instead of 5x10^1."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    lo, hi = sorted(axis.axes.get_ylim() if axis.axis_name == "y" else axis.axes.get_xlim())
    wide = lo > 0 and hi / lo > 100
    axis.set_minor_formatter(FuncFormatter(
        lambda v, _: "" if wide or round(v / 10 ** math.floor(math.log10(v)), 6) not in (2, 5) else fmt(v)))


def _log_x_ticks(ax, values: list[float], base2: bool = False) -> None:
    ax.set_xscale("log", base=2 if base2 else 10)
    ticks = sorted({float(v) for v in values if math.isfinite(v) and v > 0})
    if len(ticks) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if ticks:
        lo, hi = min(ticks), max(ticks)
        pad = 1.25 if hi / lo < 10 else 1.5
        ax.set_xlim(lo / pad, hi * pad)


def _save(fig: Figure, data: RunData, name: str, title: str, caption: str) -> Path:
    folder = data.run_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=DPI, metadata={"Title": title.replace("\n", " — ", 1).replace("\n", " "),
                                         "Software": "lorascope"})
    data.info[name] = {"title": title, "caption": caption, "reason": None, "path": path}
    return path


def _skip(data: RunData, name: str, reason: str) -> None:
    data.info[name] = {"title": None, "caption": None, "reason": reason, "path": None}


def _closed(agg: pd.DataFrame) -> pd.DataFrame:
    return agg[agg["concurrency"].notna()] if "concurrency" in agg else agg.iloc[0:0]


def _skewed(agg: pd.DataFrame) -> pd.DataFrame:
    return agg[agg["traffic"].astype(str) != "uniform"]


def _ncolors(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _legend(ax, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, framealpha=0.9, **kw)


# ---------------------------------------------------------------------------------------------------
# 1-4: the study's figures.


def throughput_vs_adapters(data: RunData) -> Path | None:
    name = "throughput_vs_adapters"
    df = _closed(data.agg)
    df = df[(df["traffic"].astype(str) == "uniform") & df["output_tok_s"].notna()] if not df.empty else df
    if df.empty:
        _skip(data, name, "no closed-loop cell with uniform traffic")
        return None
    vary = varying(df, exclude=("adapters",))
    fig = Figure(figsize=(8.5, 5.4), layout="constrained")
    ax = fig.subplots()
    for i, (first, rows) in enumerate(groups(df, vary)):
        _line(ax, rows, "adapters", "output_tok_s", color=_ncolors(i), label=label(first, vary))
    _log_x_ticks(ax, df["adapters"].tolist())
    ax.set_xlabel("adapters N (log scale)")
    ax.set_ylabel("output throughput (tok/s)")
    _limit_y(ax, [df], "output_tok_s")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    title = _title(fig, "Output throughput vs number of adapters", workload(df, data.manifest, skip=("adapters",)))
    caption = ("Output tokens per second of each cell (mean over repetitions; bars: 95% CI where a cell ran more "
               "than once) against the number of adapters the uniform traffic spreads over.")
    return _save(fig, data, name, title, caption)


def uniform_vs_zipf(data: RunData) -> Path | None:
    name = "uniform_vs_zipf"
    df = _closed(data.agg)
    df = df[df["output_tok_s"].notna()] if not df.empty else df
    panels = []
    for first, rows in groups(df, varying(df, exclude=("traffic", "adapters"))):
        laws = set(rows["traffic"].astype(str))
        if len(laws) >= 2 and laws - {"uniform"}:
            panels.append((first, rows))
    if not panels:
        _skip(data, name, "no concurrency/max_loras setting measured under two traffic laws")
        return None
    panels = sorted(panels, key=lambda fr: -len(fr[1]))[:3]
    shown = pd.concat([rows for _, rows in panels])
    panel_vary = varying(shown, exclude=("traffic", "adapters"))
    fig = Figure(figsize=(6.0 * len(panels) + 2.0, 5.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    laws = sorted(set(shown["traffic"].astype(str)), key=lambda t: (t != "uniform", t))
    for ax, (first, rows) in zip(axes, panels):
        for i, law in enumerate(laws):
            sub = rows[rows["traffic"].astype(str) == law]
            if not sub.empty:
                _line(ax, sub, "adapters", "output_tok_s", color=_ncolors(i), label=law_label(law),
                      linestyle="-" if law == "uniform" else "--")
        _log_x_ticks(ax, rows["adapters"].tolist())
        ax.set_xlabel("adapters N (log scale)")
        _limit_y(ax, [shown], "output_tok_s")
        ax.grid(True, alpha=0.3)
        if panel_vary:
            ax.set_title(label(first, panel_vary), fontsize=10)
        _legend(ax, title="traffic law", title_fontsize=8)
    axes[0].set_ylabel("output throughput (tok/s)")
    title = _title(fig, "Output throughput vs adapters: uniform vs skewed traffic",
                   workload(shown, data.manifest, skip=("traffic", "adapters")))
    caption = ("Same concurrency and max_loras, different popularity laws: uniform spreads requests evenly over the N "
               "adapters, a skewed law concentrates them on a few. Bars: 95% CI where a cell ran more than once.")
    return _save(fig, data, name, title, caption)


def _heatmap_group(data: RunData) -> pd.DataFrame | None:
    """The skewed-traffic rows (one concurrency and setting) with the largest N x max_loras grid."""
    df = _skewed(_closed(data.agg))
    best = None
    for _, rows in groups(df, varying(df, exclude=("adapters", "max_loras"))):
        score = (len(rows), rows["max_loras"].nunique(), rows["adapters"].nunique())
        if len(rows) >= 2 and (best is None or score > best[0]):
            best = (score, rows)
    return None if best is None else best[1]


def _heatmap(data: RunData, name: str, metric: str, what: str, unit: str, log: bool) -> Path | None:
    rows = _heatmap_group(data)
    if rows is None:
        _skip(data, name, "no skewed-traffic setting with at least two cells over N x max_loras")
        return None
    rows = rows[rows[metric].notna()]
    if rows.empty:
        _skip(data, name, f"no value of {metric} in the skewed-traffic grid")
        return None
    ns = sorted(rows["adapters"].astype(float).unique())
    mls = sorted(rows["max_loras"].astype(float).unique())
    grid = np.full((len(ns), len(mls)), np.nan)
    ci = np.full_like(grid, np.nan)
    for _, r in rows.iterrows():
        i, j = ns.index(float(r["adapters"])), mls.index(float(r["max_loras"]))
        grid[i, j], ci[i, j] = r[metric], r.get(f"{metric}_ci95", np.nan)
    values = grid[np.isfinite(grid)]
    lo, hi = float(values.min()), float(values.max())
    if log:
        lo, hi = max(lo, 1e-3), max(hi, 1e-3)
        norm: Normalize = LogNorm(lo / 1.5, hi * 1.5) if hi / lo < 1.5 else LogNorm(lo, hi)
    else:
        norm = Normalize(lo * 0.95, hi * 1.05) if hi == lo else Normalize(lo, hi)
    cmap = "magma_r" if log else "viridis"
    fig = Figure(figsize=(max(6.5, 1.35 * len(mls) + 3.5), max(4.2, 0.75 * len(ns) + 2.6)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for i in range(len(ns)):
        for j in range(len(mls)):
            if not math.isfinite(grid[i, j]):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="#bbbbbb",
                                       linewidth=0))
                ax.text(j, i, "not run", ha="center", va="center", fontsize=8, color="#777777")
                continue
            r, g, b, _ = image.cmap(image.norm(grid[i, j]))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            text = fmt(grid[i, j]) + (f"\n±{fmt_ci(ci[i, j], grid[i, j])}" if math.isfinite(ci[i, j]) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(mls)), [_num(v) for v in mls])
    ax.set_yticks(range(len(ns)), [_num(v) for v in ns])
    ax.set_xlabel("max_loras (GPU adapter slots)")
    ax.set_ylabel("adapters N")
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label(f"{what} ({unit})")
    if log:
        _plain_log(bar.ax.yaxis)
    title = _title(fig, f"{what} over adapters x max_loras", workload(rows, data.manifest, skip=("adapters", "max_loras")))
    caption = (f"{what} ({unit}) of each N x max_loras cell, mean over repetitions (± 95% CI where a cell ran more "
               "than once); hatched cells were not run.")
    return _save(fig, data, name, title, caption)


def heatmap_throughput(data: RunData) -> Path | None:
    return _heatmap(data, "heatmap_throughput", "output_tok_s", "Output throughput", "tok/s", log=False)


def heatmap_ttft_p99(data: RunData) -> Path | None:
    return _heatmap(data, "heatmap_ttft_p99", "ttft_ms_p99", "p99 TTFT", "ms, log colour scale", log=True)


def _sweep_groups(agg: pd.DataFrame, axis: str, exclude: tuple[str, ...]) -> list[pd.DataFrame]:
    """Groups (all other parameters equal, `exclude` free) that measured at least two values of axis;
    skewed traffic first, then the largest."""
    found = []
    for first, rows in groups(agg, varying(agg, exclude=(axis, *exclude))):
        if rows[axis].nunique() >= 2:
            most_n = -float(rows["adapters"].max()) if "adapters" in rows else 0.0
            found.append((str(first["traffic"]) == "uniform", -rows[axis].nunique(), -len(rows), most_n, rows))
    return [r for *_, r in sorted(found, key=lambda t: t[:4])]


def max_loras_ucurve(data: RunData) -> Path | None:
    name = "max_loras_ucurve"
    df = _closed(data.agg)
    df = df[df["output_tok_s"].notna()] if not df.empty else df
    sweeps = _sweep_groups(df, "max_loras", ("adapters", "policy"))[:2]
    if not sweeps:
        _skip(data, name, "no setting measured at two or more max_loras values")
        return None
    shown = pd.concat(sweeps)
    col_vary = varying(shown, exclude=("max_loras", "adapters", "policy"))
    fig = Figure(figsize=(6.2 * len(sweeps) + 2.2, 7.6), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(sweeps), sharex="col", squeeze=False))
    policies = sorted(set(shown["policy"].astype(str))) if "policy" in shown else []
    styles = {"vllm": "-", "fair": "--"}
    ns = sorted(shown["adapters"].astype(float).unique())
    for col, rows in enumerate(sweeps):
        top, bottom = axes[0, col], axes[1, col]
        for (first, sub) in groups(rows, [p for p in ("adapters", "policy") if p in rows]):
            color = _ncolors(ns.index(float(first["adapters"])))
            pol = str(first.get("policy", ""))
            ls = styles.get(pol, ["-", "--", ":", "-."][policies.index(pol) % 4] if pol in policies else "-")
            lab = f"N={_num(first['adapters'])}" + (f", {pol} policy" if len(policies) > 1 else "")
            _line(top, sub, "max_loras", "output_tok_s", color=color, linestyle=ls, label=lab)
            _line(bottom, sub, "max_loras", "ttft_ms_p99", log_y=True, color=color, linestyle=ls, label=lab)
        _log_x_ticks(bottom, rows["max_loras"].tolist(), base2=True)
        _limit_y(top, [rows], "output_tok_s")
        top.set_ylabel("output throughput (tok/s)")
        bottom.set_yscale("log")
        _limit_y(bottom, [rows], "ttft_ms_p99", log=True)
        bottom.set_ylabel("p99 TTFT (ms, log scale)")
        bottom.set_xlabel("max_loras (GPU adapter slots, log scale)")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
        if col_vary:
            top.set_title(label(rows.iloc[0], col_vary), fontsize=10)
        _legend(top)
    title = _title(fig, "Throughput and p99 TTFT vs max_loras",
                   workload(shown, data.manifest, skip=("max_loras", "adapters")))
    caption = ("Top: output tok/s; bottom: p99 time to first token (log scale), against the number of GPU adapter "
               "slots, one line per adapter count" + (" (solid: vllm policy, dashed: fair)" if len(policies) > 1 else "")
               + ". Bars: 95% CI where a cell ran more than once.")
    return _save(fig, data, name, title, caption)


# ---------------------------------------------------------------------------------------------------
# 5-10: what the study lacked.


def memory(data: RunData) -> Path | None:
    name = "memory"
    df = data.agg
    cols = [c for c, _, _ in MEM_PARTS if c in df]
    if df.empty or not cols or df[cols].notna().sum().sum() == 0:
        _skip(data, name, "no memory columns (mem_*_bytes) in cells.csv")
        return None
    df = df[df[cols].notna().any(axis=1)]
    config = [p for p in ("engine", "model", "max_loras", "max_cpu_loras", "max_lora_rank") if p in df]
    bar_vary = [p for p in config if not _constant(df, p)[0]] or ["max_loras"]
    bars = []
    for first, rows in groups(df, config):
        values = {c: float(rows[c].max() if c == "mem_host_tier_bytes" else rows[c].mean()) if c in rows else 0.0
                  for c, _, _ in MEM_PARTS}
        source = ",".join(sorted({s for v in rows.get("mem_source", pd.Series(dtype=str)).dropna()
                                  for s in str(v).split(",") if s})) or "unknown"
        bars.append((label(first, bar_vary).replace("max_loras ", "max_loras\n"), values, source))
    total_max = max(sum(v for v in vals.values() if math.isfinite(v)) for _, vals, _ in bars)
    unit, scale = ("GiB", 2**30) if total_max >= 2**30 else ("MiB", 2**20)
    fig = Figure(figsize=(max(9.0, 1.6 * len(bars) * 2 + 3), 5.6), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    xs = np.arange(len(bars))
    for ax, parts in ((left, MEM_PARTS), (right, MEM_PARTS[2:])):
        bottom = np.zeros(len(bars))
        for col, _, color in parts:
            vals = np.array([np.nan_to_num(b[1][col]) / scale for b in bars])
            hatches = ["//" if "estimated" in b[2] else None for b in bars]
            for x, v, b0, h in zip(xs, vals, bottom, hatches):
                ax.bar(x, v, bottom=b0, color=color, hatch=h, edgecolor="white" if h is None else "black",
                       linewidth=0.5, width=0.6)
            bottom += vals
        for x, top in zip(xs, bottom):
            ax.text(x, top, f"{top:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [b[0] for b in bars], fontsize=8)
        ax.set_ylabel(f"memory ({unit})")
        ax.set_ylim(0, max(bottom.max(), 1e-9) * 1.15)
        ax.grid(True, axis="y", alpha=0.3)
    left.set_title("every component", fontsize=10)
    right.set_title("the adapter components only (what the LoRA knobs change)", fontsize=10)
    handles = [Patch(color=c, label=lab) for _, lab, c in MEM_PARTS]
    sources = sorted({s for _, _, src in bars for s in src.split(",")})
    if "estimated" in sources:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="estimated (not measured)"))
    left.legend(handles=handles, fontsize=8, loc="upper left")
    title = _title(fig, f"Memory by component ({' and '.join(sources)})",
                   workload(df, data.manifest, skip=("max_loras", "adapters", "traffic")))
    caption = (f"Memory per engine configuration, in {unit}: base weights, KV cache, device adapter slots and the "
               "host tier (its peak over the configuration's cells). Source: " + ", ".join(sources)
               + " (hatched bars are estimates from the configuration, not measurements).")
    return _save(fig, data, name, title, caption)


def _request_group(data: RunData) -> pd.DataFrame | None:
    """The parameter group set with the most max_loras values (skewed traffic first), for which
    request records exist."""
    req = data.requests
    if req.empty or data.agg.empty:
        return None
    have = set(req["cell_id"].astype(str))
    agg = data.agg[data.agg["cell_ids"].map(lambda s: bool(set(str(s).split(",")) & have))]
    if agg.empty:
        return None
    sweeps = _sweep_groups(agg, "max_loras", ())
    if sweeps:
        return sweeps[0]
    skewed = _skewed(agg)
    pick = skewed if not skewed.empty else agg
    return pick.sort_values(["adapters", "concurrency"], ascending=False).iloc[[0]]


def _requests_of(data: RunData, group: int) -> pd.DataFrame:
    req = data.requests
    runs = set(data.runs_of(group))
    mask = [(c, int(r)) in runs for c, r in zip(req["cell_id"].astype(str), req["repetition"])]
    return req[np.asarray(mask, dtype=bool)]


def ttft_cdf(data: RunData) -> Path | None:
    name = "ttft_cdf"
    rows = _request_group(data)
    if rows is None:
        _skip(data, name, "no request records")
        return None
    fig = Figure(figsize=(8.5, 5.4), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for i, (_, r) in enumerate(rows.sort_values("max_loras").iterrows()):
        req = _requests_of(data, int(r["group"]))
        ttft = np.sort(req.loc[(req["status"] == "ok"), "ttft_ms"].dropna().to_numpy(dtype=float))
        ttft = ttft[ttft > 0]
        if ttft.size == 0:
            continue
        drawn += 1
        y = np.arange(1, ttft.size + 1) / ttft.size
        reps = f", {int(r['n'])} reps" if int(r["n"]) > 1 else ""
        ax.step(ttft, y, where="post", color=_ncolors(i), linewidth=1.6,
                label=f"max_loras {_num(r['max_loras'])} ({ttft.size} requests{reps})")
    if not drawn:
        _skip(data, name, "no successful measured request in the chosen cells")
        return None
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    for q in (0.5, 0.9, 0.99):
        ax.axhline(q, color="#999999", linewidth=0.8, linestyle=":")
        ax.text(1.0, q, f" p{int(q * 100)}", transform=ax.get_yaxis_transform(), fontsize=8, va="center",
                color="#555555")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, loc="lower right")
    title = _title(fig, "TTFT distribution per max_loras", workload(rows, data.manifest, skip=("max_loras",)))
    caption = ("Empirical CDF of time to first token (from the intended send time) of every measured, successful "
               "request, repetitions pooled, for the setting with the most max_loras values.")
    return _save(fig, data, name, title, caption)


def _contrast_rows(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.sort_values("max_loras")
    return rows.iloc[[0, -1]] if len(rows) >= 2 else rows


def per_adapter(data: RunData) -> Path | None:
    from lorascope.results.summary import per_adapter as per_adapter_table

    name = "per_adapter"
    rows = _request_group(data)
    if rows is None:
        _skip(data, name, "no request records")
        return None
    fig = Figure(figsize=(8.5, 5.6), layout="constrained")
    ax = fig.subplots()
    drawn, ranks = 0, 1
    for i, (_, r) in enumerate(_contrast_rows(rows).iterrows()):
        req = _requests_of(data, int(r["group"]))
        if req.empty or not (req["status"] == "ok").any():
            continue
        table = per_adapter_table(req.assign(warmup=False))
        rank = np.arange(1, len(table) + 1)
        ranks = max(ranks, len(table))
        jain = r.get("jain_fairness", np.nan)
        who = f"max_loras {_num(r['max_loras'])} (Jain {fmt(float(jain), 3)})"
        color = _ncolors(i)
        ax.plot(rank, table["ttft_ms_p50"], color=color, marker="o", markersize=4, linestyle="-",
                label=f"{who}: p50")
        ax.plot(rank, table["ttft_ms_p99"], color=color, marker="^", markersize=4, linestyle="--",
                label=f"{who}: p99")
        drawn += 1
    if not drawn:
        _skip(data, name, "no successful measured request in the chosen cells")
        return None
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, ranks * 1.25)
    _plain_log(ax.xaxis)
    _plain_log(ax.yaxis)
    ax.set_xlabel("adapter popularity rank (1 = most requests, log scale)")
    ax.set_ylabel("TTFT per adapter (ms, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, loc="upper left")
    title = _title(fig, "Per-adapter TTFT vs popularity", workload(rows, data.manifest, skip=("max_loras",)))
    caption = ("p50 (solid) and p99 (dashed) time to first token of each adapter's measured requests against its "
               "popularity rank, at the lowest and highest max_loras of the setting; Jain's fairness index "
               "(1 = every adapter served alike) in the legend. Rare adapters have few requests: their p99 is "
               "close to their maximum.")
    return _save(fig, data, name, title, caption)


def working_set(data: RunData) -> Path | None:
    name = "working_set"
    need = ("predicted_distinct", "active_adapters_mean")
    df = data.agg
    if df.empty or any(c not in df for c in need):
        _skip(data, name, "no predicted or measured working-set columns")
        return None
    df = df[df["predicted_distinct"].notna() & df["active_adapters_mean"].notna()]
    if df.empty:
        _skip(data, name, "no cell has both the predicted and the measured working set")
        return None
    fig = Figure(figsize=(8.0, 6.6), layout="constrained")
    ax = fig.subplots()
    mls = sorted(df["max_loras"].astype(float).unique())
    capped_any = False
    for pred, meas, marker in (("predicted_distinct", "active_adapters_mean", "o"),
                               ("predicted_p90_distinct", "active_adapters_p90", "^")):
        if pred not in df or meas not in df:
            continue
        for _, r in df.iterrows():
            x, y = float(r[pred]), float(r[meas])
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            color = _ncolors(mls.index(float(r["max_loras"])))
            capped = float(r["max_loras"]) < float(r.get("predicted_p90_distinct", np.nan) or np.nan)
            capped_any |= capped
            ci = float(r.get(f"{meas}_ci95", np.nan))
            if math.isfinite(ci):
                ax.errorbar(x, y, yerr=ci, fmt="none", ecolor=color, capsize=3)
            ax.plot(x, y, marker=marker, markersize=8, linestyle="none", color=color,
                    markerfacecolor="white" if capped else color, markeredgewidth=1.6)
    hi = float(np.nanmax(df[[c for c in ("predicted_distinct", "predicted_p90_distinct", "active_adapters_mean",
                                          "active_adapters_p90") if c in df]].to_numpy(dtype=float)))
    ax.plot([0, hi * 1.1], [0, hi * 1.1], color="#888888", linestyle=":", linewidth=1)
    ax.set_xlim(0, hi * 1.1)
    ax.set_ylim(0, hi * 1.1)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("predicted distinct adapters per step (model, from the traffic law)")
    ax.set_ylabel("measured active adapters per step (server metrics)")
    handles = [Line2D([], [], marker="o", linestyle="none", color="#444444", label="mean (predicted vs measured)"),
               Line2D([], [], marker="^", linestyle="none", color="#444444", label="p90 (predicted vs measured)"),
               Line2D([], [], color="#888888", linestyle=":", label="measured = predicted")]
    if capped_any:
        handles.append(Line2D([], [], marker="o", linestyle="none", color="#444444", markerfacecolor="white",
                              label="hollow: max_loras < predicted p90 (measured capped)"))
    handles += [Line2D([], [], marker="s", linestyle="none", color=_ncolors(i), label=f"max_loras {_num(m)}")
                for i, m in enumerate(mls)]
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    title = _title(fig, "Working set: predicted vs measured distinct adapters per step",
                   workload(df, data.manifest, skip=("max_loras", "adapters", "traffic", "concurrency")))
    caption = ("Each point is one parameter group: the working-set model's expected (circles) and p90 (triangles) "
               "distinct adapters among the c requests in flight, against the server's measured mean and p90 "
               "adapters per step. Hollow points had fewer slots than the predicted p90, so the measured value is "
               "held down by max_loras. Points below the diagonal also arise when fewer than c requests share a "
               "step (prefill, arrivals).")
    return _save(fig, data, name, title, caption)


def _series_cells(data: RunData) -> list[pd.Series]:
    """A few contrasting cells: lowest and highest max_loras of the main sweep, and the uniform cell
    with the most adapters at the highest concurrency."""
    picks: list[pd.Series] = []
    agg = _closed(data.agg)
    sweeps = _sweep_groups(agg, "max_loras", ())
    if sweeps:
        picks += [r for _, r in _contrast_rows(sweeps[0]).iterrows()]
    uniform = agg[agg["traffic"].astype(str) == "uniform"]
    if not uniform.empty:
        picks.append(uniform.sort_values(["concurrency", "adapters"], ascending=False).iloc[0])
    if not picks and not agg.empty:
        picks.append(agg.sort_values(["adapters"], ascending=False).iloc[0])
    seen, out = set(), []
    for r in picks:
        if int(r["group"]) not in seen:
            seen.add(int(r["group"]))
            out.append(r)
    return out[:4]


def active_adapters_over_time(data: RunData) -> Path | None:
    from lorascope.loadgen.scrape import active_series

    name = "active_adapters_over_time"
    sm = data.server_metrics
    if sm.empty:
        _skip(data, name, "no server metrics (server_metrics.parquet)")
        return None
    panels = []
    for r in _series_cells(data):
        for cell, rep in data.runs_of(int(r["group"]))[:1]:
            frame = sm[(sm["cell_id"].astype(str) == cell) & (sm["repetition"].astype(int) == rep)]
            series = active_series(frame) if not frame.empty else pd.DataFrame()
            if not series.empty:
                panels.append((r, cell, rep, series))
    if not panels:
        _skip(data, name, "no active-adapter series in the server metrics of the chosen cells")
        return None
    fig = Figure(figsize=(9.0, 2.5 * len(panels) + 1.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)[:, 0])
    shown = pd.DataFrame([p[0] for p in panels])
    vary = varying(shown) or ["max_loras"]
    t_max = max(float(p[3]["t_s"].max()) for p in panels)
    for ax, (r, cell, rep, series) in zip(axes, panels):
        t, active = series["t_s"].to_numpy(dtype=float), series["active"].to_numpy(dtype=float)
        ax.plot(t, active, marker="o", markersize=4, color="#1f77b4", label="active adapters per step")
        cap = float(r["max_loras"])
        ax.axhline(cap, color="#d62728", linestyle="--", linewidth=1.2, label=f"max_loras cap ({_num(cap)})")
        if math.isfinite(float(r.get("predicted_distinct", np.nan))):
            ax.axhline(float(r["predicted_distinct"]), color="#2ca02c", linestyle=":", linewidth=1.2,
                       label=f"predicted mean ({float(r['predicted_distinct']):.1f})")
        pred = float(r.get("predicted_distinct", np.nan))
        ax.set_ylim(0, max(cap, float(np.nanmax(active)), pred if math.isfinite(pred) else 0.0, 1.0) * 1.45)
        ax.set_xlim(0, t_max * 1.05)
        ax.set_ylabel("adapters / step")
        ax.set_title(f"{label(r, vary)}   [{cell}, rep {rep}]", fontsize=9)
        ax.grid(True, alpha=0.3)
        _legend(ax, loc="upper center", ncol=3)
    axes[-1].set_xlabel("time since the cell started (s)")
    title = _title(fig, "Active adapters per step over time", workload(shown, data.manifest, skip=tuple(vary)))
    caption = ("Distinct adapters per engine step between two scrapes of the server's metrics (the embedded engine: "
               "every step counted; other engines: vLLM's running-adapter gauge at each scrape), for a few "
               "contrasting cells; dashed: the max_loras cap, dotted: the working-set model's expectation.")
    return _save(fig, data, name, title, caption)


def policy_comparison(data: RunData) -> Path | None:
    name = "policy_comparison"
    df = data.agg  # closed and open loop: starvation under the skip rule shows most with open-loop arrivals
    if df.empty or "policy" not in df or not {"fair", "vllm"} <= set(df["policy"].astype(str)):
        _skip(data, name, "the run does not have both the fair and the vllm policy")
        return None
    df = df[df["policy"].astype(str).isin(["fair", "vllm"])]
    pairs = [(first, rows) for first, rows in groups(df, varying(df, exclude=("policy",)))
             if set(rows["policy"].astype(str)) == {"fair", "vllm"}]
    if not pairs:
        _skip(data, name, "no setting was measured under both policies")
        return None
    shown = pd.concat([rows for _, rows in pairs])
    vary = varying(shown, exclude=("policy",)) or ["max_loras"]
    names = [label(first, vary).replace(", ", "\n") for first, _ in pairs]
    xs = np.arange(len(pairs))
    fig = Figure(figsize=(max(8.5, 1.2 * len(pairs) + 4), 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for k, (pol, color) in enumerate((("vllm", "#1f77b4"), ("fair", "#ff7f0e"))):
        for ax, metric, log in ((top, "output_tok_s", False), (bottom, "ttft_ms_p99", True)):
            vals, errs = [], []
            for _, rows in pairs:
                r = rows[rows["policy"].astype(str) == pol].iloc[0]
                vals.append(float(r[metric]))
                errs.append(float(r.get(f"{metric}_ci95", np.nan)))
            v, e = np.array(vals), np.nan_to_num(np.array(errs))
            low = np.minimum(e, v * 0.999) if log else np.minimum(e, v)
            ax.bar(xs + (k - 0.5) * 0.38, v, width=0.38, color=color, label=f"{pol} policy")
            has = e > 0  # a single run has no interval: draw no (zero-length) bar for it
            if has.any():
                ax.errorbar((xs + (k - 0.5) * 0.38)[has], v[has], yerr=[low[has], e[has]], fmt="none", capsize=3,
                            elinewidth=1, ecolor="#333333")
    top.set_ylabel("output throughput (tok/s)")
    bottom.set_ylabel("p99 TTFT (ms, log scale)")
    bottom.set_yscale("log")
    _limit_y(top, [shown], "output_tok_s")
    _limit_y(bottom, [shown], "ttft_ms_p99", log=True)
    bottom.set_xticks(xs, names, fontsize=8)
    for ax in (top, bottom):
        ax.grid(True, axis="y", which="both", alpha=0.3)
    _legend(top)
    title = _title(fig, "Scheduling policy: fair vs vllm", workload(shown, data.manifest, skip=("policy", *vary)))
    caption = ("The same workloads under the two schedulers of the embedded engine: vllm (skips a request whose "
               "adapter has no slot) and fair (bounded wait, adapter grouping, prefetch). Bars: 95% CI where a cell "
               "ran more than once.")
    return _save(fig, data, name, title, caption)


# ---------------------------------------------------------------------------------------------------
# The registry.

FIGURES: dict[str, Callable[[RunData], Path | None]] = {
    "throughput_vs_adapters": throughput_vs_adapters,
    "uniform_vs_zipf": uniform_vs_zipf,
    "heatmap_throughput": heatmap_throughput,
    "heatmap_ttft_p99": heatmap_ttft_p99,
    "max_loras_ucurve": max_loras_ucurve,
    "memory": memory,
    "ttft_cdf": ttft_cdf,
    "per_adapter": per_adapter,
    "working_set": working_set,
    "active_adapters_over_time": active_adapters_over_time,
    "policy_comparison": policy_comparison,
}


def draw(data: RunData) -> dict[str, dict[str, Any]]:
    """Draw every figure; returns data.info: per figure its path (or None), title, caption, reason."""
    for fn in FIGURES.values():
        fn(data)
    return {name: data.info[name] for name in FIGURES}


def draw_all(run_dir: Path) -> list[Path]:
    """Write every figure the run has the cells for to run_dir/figures/; returns the written paths."""
    data = load_run(Path(run_dir))
    return [info["path"] for info in draw(data).values() if info["path"] is not None]
