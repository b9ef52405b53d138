"""The sweep driver behind `lorascope run`: every cell of a spec, a fresh server each, into one run
directory; resumable.

Order of writes for one cell x repetition: its log, its server metrics, its summary, and last its
records file, whose presence marks it finished (written to a temporary name and renamed). A run
killed at any point (kill -9 included) resumes with `lorascope run --resume DIR`: finished cells are
skipped, never redone, and an unfinished one starts over from nothing. A cell that fails (a server
that will not start, a bad adapter) is written to `failures/` and the sweep goes on; `--resume`
retries it.

Adapters are made once per rank (the largest N of the grid) under `adapters/pool-rRANK/`; a cell
with N adapters serves `adapters/rRANK-nN/`, a directory of links to the first N of them, so every
server is given exactly the adapters its cell names.

With `verify` (`lorascope run --verify`), `lorascope verify` runs once before the cells on the run's
engine, model and first VERIFY_ADAPTERS adapters of the first cell's pool, and writes `verify.json`,
which the report shows as a correctness stamp on its first page. Recorded in the manifest, so a
resumed run verifies too when it had not finished doing so.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from lorascope.adapters.peft import list_adapter_dirs
from lorascope.adapters.synthetic import make_adapters
from lorascope.bench import BenchSpec, engine_version, measure_cell, progress_columns
from lorascope.experiment import Cell, ExperimentSpec, SpecError
from lorascope.loadgen.targets import CellKnobs
from lorascope.model.weights import DTYPES, load_model, resolve_config, save_model
from lorascope.results.records import finished_cells
from lorascope.results.rundir import finish_manifest, write_cells_csv, write_manifest

VERIFY_ADAPTERS = 6  # adapters `run --verify` checks (K=2 prompts x 16 tokens each, and the base model)
SERVER_MODE = "fresh server per cell x repetition (started before its warm-up, stopped after its last request)"


@dataclass(slots=True)
class RunResult:
    run_dir: Path
    ran: int = 0  # cell x repetitions measured by this call
    skipped: int = 0  # already finished before this call
    failed: list[str] = field(default_factory=list)
    report: Path | None = None
    verify: str | None = None  # the verdict of `--verify` (pass | fail | error), None when not asked


def resolve_auto(spec: ExperimentSpec) -> ExperimentSpec:
    """Fill `auto` model/device/dtype from the hardware: an 8B shape in bf16 on a GPU, tiny fp32 on CPU."""
    import torch

    gpu = torch.cuda.is_available()
    data = spec.to_dict()
    if spec.device == "auto":
        data["device"] = "cuda" if gpu else "cpu"
    on_gpu = data["device"].startswith("cuda")
    if spec.model == "auto":
        data["model"] = "llama-3.1-8b" if on_gpu else "tiny"
    if spec.dtype == "auto":
        data["dtype"] = "bfloat16" if on_gpu else "float32"
    return ExperimentSpec.from_dict(data, f"spec {spec.name!r}")


def start_run(spec: ExperimentSpec, out: Path, command: list[str]) -> None:
    """Create the run directory and its manifest; refuses a directory that already holds a run."""
    if (out / "manifest.json").exists():
        raise SpecError(f"{out} already holds a run; continue it with `lorascope run --resume {out}` "
                        "or pick another --out (nothing in it is overwritten)")
    if out.exists() and any(out.iterdir()):
        raise SpecError(f"{out} exists and is not empty; pick a new --out directory")
    spec = resolve_auto(spec)
    cells = spec.cells()
    write_manifest(out, spec.to_dict(), {"name": spec.engine, "version": "(per cell: see engine_versions)"}, command)
    _update_manifest(out, preset=spec.name, server_mode=SERVER_MODE, cells=len(cells),
                     runs=len(spec.runs()), resumes=[])


def resume_spec(out: Path) -> ExperimentSpec:
    path = out / "manifest.json"
    if not path.exists():
        raise SpecError(f"{out} has no manifest.json: it is not a run directory (start one with `lorascope run --out {out}`)")
    manifest = json.loads(path.read_text())
    return ExperimentSpec.from_dict(manifest["spec"], f"{path} spec")


def run_experiment(out: Path, progress: bool = True, report: bool = True, console: Console | None = None,
                   verify: bool = False) -> RunResult:
    """Measure every unfinished cell x repetition of the run directory's spec, then draw the report
    (first `verify`ing the engine when asked now or when the run was started with it)."""
    console = console or Console(stderr=True)
    spec = resume_spec(out)
    result = RunResult(out)
    if verify:
        _update_manifest(out, verify=True)
    if verify or json.loads((out / "manifest.json").read_text()).get("verify"):
        result.verify = _verify(spec, out, console)
    done = finished_cells(out)
    runs = spec.runs()
    todo = [(c, rep) for c, rep in runs if (c.cell_id, rep) not in done]
    result.skipped = len(runs) - len(todo)
    if result.skipped:
        console.print(f"resuming {out}: {result.skipped} of {len(runs)} cell runs already finished, {len(todo)} to go")
        manifest = json.loads((out / "manifest.json").read_text())
        _update_manifest(out, resumes=[*manifest.get("resumes", []), {"at": time.time(), "finished_before": result.skipped,
                                                                       "command": sys.argv}])
    model_path = _model_for(spec, out) if todo else spec.model
    versions: dict[str, str] = json.loads((out / "manifest.json").read_text()).get("engine_versions", {})
    with Progress(*progress_columns(), disable=not progress, console=console) as bar:
        overall = bar.add_task(f"{spec.name}: cells", total=len(runs), completed=result.skipped)
        for cell, rep in todo:
            bar.update(overall, description=f"{spec.name}: {cell.cell_id} rep {rep}")
            bench = _bench_spec(spec, cell, rep, model_path)
            if cell.engine not in versions:
                versions[cell.engine] = engine_version(bench)
                _update_manifest(out, engine_versions=versions)
            try:
                adapters_root = _adapter_set(spec, cell, model_path, out)
                bench.adapters_dir = adapters_root
                measure_cell(bench, out, model_path, list_adapter_dirs(adapters_root), adapters_root, bar)
                _clear_failure(out, cell, rep)
                result.ran += 1
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # one broken cell must not lose the sweep: record it and go on
                _record_failure(out, cell, rep, e)
                result.failed.append(f"{cell.cell_id} rep {rep}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                console.print(f"[red]cell failed[/red] {cell.cell_id} rep {rep}: {str(e).splitlines()[0][:200]} "
                              f"(details in {out / 'failures'}; `--resume` retries it)")
            write_cells_csv(out)
            bar.advance(overall)
    write_cells_csv(out)
    finish_manifest(out, failed=result.failed)
    if report:
        from lorascope.analysis.report import build_report

        result.report = build_report(out)
    return result


def _verify(spec: ExperimentSpec, out: Path, console: Console) -> str:
    """`lorascope verify` on the run's engine, model and first adapters, into out/verify.json (once)."""
    path = out / "verify.json"
    if path.exists() and json.loads(path.read_text()).get("verdict") in ("pass", "fail"):
        return str(json.loads(path.read_text())["verdict"])  # done before this resume; an error is retried
    from lorascope.verifycmd import VerifySpec, run_verify

    cell = spec.cells()[0]
    try:
        model_path = _model_for(spec, out)
        largest = max(c.adapters for c in spec.cells() if c.rank == cell.rank)
        _adapter_set(spec, cell, model_path, out)  # makes the rank's pool
        adapters = _adapter_set(spec, replace(cell, adapters=max(1, min(VERIFY_ADAPTERS, largest))), model_path, out)
        vspec = VerifySpec(adapters_dir=adapters, engine=cell.engine, model=model_path, prompts=2, tokens=16,
                           dtype=spec.dtype, device=spec.device, url=spec.url, vllm_cmd=spec.vllm_cmd,
                           sglang_cmd=spec.sglang_cmd)
        console.print(f"verify: {cell.engine} on {model_path} with {len(list_adapter_dirs(adapters))} adapters")
        result = run_verify(vspec, out, lambda line: console.print(f"  verify: {line}", markup=False))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # the cells still run; the report says the run is not verified, and why
        result = {"verdict": "error", "summary": f"verify could not run: {type(e).__name__}: {str(e)[:500]}"}
        path.write_text(json.dumps(result, indent=1))
    color = {"pass": "green", "fail": "red"}.get(result["verdict"], "yellow")
    console.print(f"verify: {result['summary']}", style=color, markup=False)
    return str(result["verdict"])


def _bench_spec(spec: ExperimentSpec, cell: Cell, rep: int, model_path: str) -> BenchSpec:
    max_rank = spec.max_lora_rank or max(c.rank for c in spec.cells())
    knobs = CellKnobs(max_loras=cell.max_loras, max_cpu_loras=cell.max_cpu_loras, max_lora_rank=max_rank,
                      max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len,
                      policy=cell.policy if cell.engine == "embedded" else "fair", dtype=spec.dtype,
                      device=spec.device, extra_args=list(spec.extra_server_args))
    return BenchSpec(engine=cell.engine, model=spec.model, num_adapters=cell.adapters, rank=cell.rank,
                     targets=spec.targets, traffic=cell.traffic, concurrency=cell.concurrency, rate=cell.rate,
                     arrival=spec.arrival, requests=spec.requests, warmup=spec.warmup, warmup_mode=spec.warmup_mode,
                     input_len=spec.input_len, output_len=spec.output_len, slo_ttft_ms=spec.slo_ttft_ms,
                     slo_tpot_ms=spec.slo_tpot_ms, seed=spec.seed + rep, cell_id=cell.cell_id, repetition=rep,
                     sweep=cell.sweep, url=spec.url, vllm_cmd=spec.vllm_cmd, sglang_cmd=spec.sglang_cmd, knobs=knobs)


def _model_for(spec: ExperimentSpec, out: Path) -> str:
    """What servers load: the embedded engine takes a preset name; other engines need a directory,
    so a preset is written once to `model/` (its dtype, so vLLM reads the same weights)."""
    engines = {c.engine for c in spec.cells()}
    if engines <= {"embedded", "url"} or Path(spec.model).is_dir():
        return spec.model
    path = out / "model"
    if not (path / "config.json").exists():
        save_model(load_model(spec.model, spec.dtype, "cpu" if spec.dtype == "float32" else spec.device), path)
    return str(path)


def _adapter_set(spec: ExperimentSpec, cell: Cell, model_path: str, out: Path) -> Path:
    """`adapters/rRANK-nN/`: links to the first N adapters of the rank's pool (made once, for the largest N)."""
    pool = out / "adapters" / f"pool-r{cell.rank}"
    largest = max(c.adapters for c in spec.cells() if c.rank == cell.rank)
    if not (pool / ".complete").exists():
        if pool.exists():
            import shutil

            shutil.rmtree(pool)  # a pool interrupted while being made: make it again
        dtype = DTYPES["bfloat16" if spec.dtype == "bfloat16" else spec.dtype]
        resolve_config(model_path)  # a clear error for a bad model before writing 1,000 adapters
        make_adapters(pool, model_path, largest, cell.rank, spec.targets.split(","), seed=spec.seed, dtype=dtype)
        (pool / ".complete").write_text(str(largest))
    target = out / "adapters" / f"r{cell.rank}-n{cell.adapters}"
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(list_adapter_dirs(pool))[: cell.adapters]:
            link = target / name
            if not link.exists():
                link.symlink_to(Path("..") / pool.name / name, target_is_directory=True)
        (target / ".complete").write_text(str(cell.adapters))
    return target


def _record_failure(out: Path, cell: Cell, rep: int, error: BaseException) -> None:
    folder = out / "failures"
    folder.mkdir(exist_ok=True)
    text = f"{cell.cell_id} rep {rep} failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n" + "".join(
        traceback.format_exception(error))
    (folder / f"{cell.cell_id}-rep{rep}.txt").write_text(text)


def _clear_failure(out: Path, cell: Cell, rep: int) -> None:
    (out / "failures" / f"{cell.cell_id}-rep{rep}.txt").unlink(missing_ok=True)


def _update_manifest(out: Path, **fields_: Any) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest |= fields_
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)

