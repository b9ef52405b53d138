"""CUDA-graph steps (engine/runner.py): greedy tokens identical to the eager path and to HF
transformers + PEFT, across token buckets, for decode steps and steps mixing prefill chunks with decode.
GPU only (benchmarks/gpu_graphs_check.py runs the same check on the device machine)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from lorascope import LLM, SamplingParams
from lorascope.adapters.synthetic import make_adapters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen2"])
def test_graph_decode_equals_eager_and_hf(tmp_path: Path, model: str) -> None:
    from lorascope.reference import hf_model_sharing, reference_generate

    root = tmp_path / "a"
    make_adapters(root, model, 6, [8, 16], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  seed=4)
    names: list[str | None] = [f"a{i:04d}" for i in range(6)] + [None, None]
    gen = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(0, 250, (5 + (7 * i) % 56,), generator=gen).tolist(), names[i % len(names)]) for i in range(30)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(model, root, device="cuda", dtype="float32", max_loras=4, max_cpu_loras=8, max_num_seqs=12,
                  max_num_batched_tokens=96, enforce_eager=eager)
        outs[eager] = [o.token_ids for o in llm.generate([p for p, _ in reqs], params, [a for _, a in reqs])]
        if not eager:
            runner = llm.engine.runner
            assert runner.eager_steps == 0, "every step fits a token bucket (<= 96 tokens): none may run eagerly"
            assert max(runner.graphs) > 12, f"no step with a prefill chunk was replayed: buckets {sorted(runner.graphs)}"
            hf = hf_model_sharing(llm.engine.runner.model, "cuda")
            ref = reference_generate(hf, {n: root / n for n in names if n}, reqs, 24, device="cuda", dtype=torch.float32)
        llm.close()
    assert outs[False] == outs[True]
    assert outs[False] == [r.token_ids for r in ref]


def test_gpu_step_trace_times_every_step() -> None:
    llm = LLM("tiny", device="cuda", dtype="float32", max_num_seqs=4)
    engine = llm.engine
    engine.trace_gpu(True)
    llm.generate([[1, 2, 3, 4]] * 3, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    times = engine.gpu_step_times()
    steps = [s.step for s in engine.steps]
    assert [t[0] for t in times] == steps  # one record per step that ran, in order
    assert all(ms > 0 for _, _, ms in times)
    assert all(b[1] >= a[1] + a[2] * 0.999 for a, b in itertools.pairwise(times))  # steps follow each other on the GPU
    engine.trace_gpu(False)
    assert engine.gpu_step_times() == []
    llm.close()


def test_capture_survives_a_thread_that_page_locks_and_syncs() -> None:
    """The adapter loaders page-lock host buffers and synchronize their copy stream while a bucket may be
    captured on first use: under torch's default capture mode ("global") either call invalidates it."""
    import threading

    llm = LLM("tiny", device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=64)
    runner = llm.engine.runner
    stop, errors = threading.Event(), []

    def loader() -> None:
        stream = torch.cuda.Stream()
        try:
            while not stop.is_set():
                host = torch.randn(1 << 16).pin_memory()
                with torch.cuda.stream(stream):
                    host.to("cuda", non_blocking=True)
                stream.synchronize()
        except Exception as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=loader)
    thread.start()
    try:
        runner.capture_all()
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert sorted(runner.graphs) == runner.token_buckets
    out = llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == 4 for o in out)
    llm.close()


def test_lora_shrink_beside_the_gemm_changes_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shrink on the side stream (the default) against after the GEMM on one stream, bf16, adapters on
    every module (packed q/k/v and gate/up, and the single o/down), graph and eager steps."""
    root = tmp_path / "a"
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    make_adapters(root, "tiny", 4, [8, 16], modules, seed=6, dtype=torch.bfloat16)
    names = [f"a{i:04d}" for i in range(4)] + [None]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 250, (4 + 9 * i,), generator=gen).tolist() for i in range(10)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = {}
    for overlap, eager in itertools.product(("1", "0"), (False, True)):
        monkeypatch.setenv("LORASCOPE_LORA_OVERLAP", overlap)
        llm = LLM("tiny", root, device="cuda", dtype="bfloat16", max_loras=4, max_num_seqs=6, max_num_batched_tokens=48,
                  enforce_eager=eager)
        assert (llm.engine.runner.side_stream is not None) == (overlap == "1")
        outs[overlap, eager] = [o.token_ids for o in llm.generate(prompts, params, [names[i % 5] for i in range(10)])]
        llm.close()
    assert outs["1", False] == outs["0", False]
    assert outs["1", True] == outs["0", True]
