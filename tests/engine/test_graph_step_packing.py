"""The CUDA-graph step's host side (engine/runner.py `_execute_graph`), checked on the CPU.

A captured step reads static buffers the runner rewrites each step: token ids, positions and KV rows
per token, and per sequence (q_start, q_len, seq_len, block table), plus the LoRA segments. The graph
itself needs a GPU (tests/engine/test_cuda_graphs.py); here its replay is a no-op and the buffers it
would read are compared with what the eager path builds for the same step (`AttentionMetadata.build`
with `varlen=True`, i.e. kernels/varlen_attention_triton.py's own packing), for a step that mixes
decode tokens, a prefill chunk, a chunk after a cached prefix and a base-model request, one of whose
input tokens is still PENDING (a pipelined step: the graph reads it from the device's `sampled`).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from lorascope import LLM, SamplingParams
from lorascope.engine import runner as runner_mod
from lorascope.engine.request import PENDING
from lorascope.kernels.attention import AttentionMetadata
from lorascope.kernels.lora_triton import LoRAMeta


def test_graph_step_buffers_match_the_eager_metadata() -> None:
    llm = LLM("tiny", "synthetic:4:8", device="cpu", dtype="float32", max_loras=4, max_cpu_loras=4, max_num_seqs=8,
              max_num_batched_tokens=64, lora_target_modules=("q_proj", "v_proj"))
    eng, run = llm.engine, llm.engine.runner
    bucket, cap = 64, 8
    store = run.store
    assert store is not None
    meta = LoRAMeta.build([], {m: store.ranks[m] for m in store.modules}, {m: store.scales[m] for m in store.modules},
                          "cpu", capacity=cap, max_len_bound=bucket)
    fake = runner_mod._StepGraph(types.SimpleNamespace(replay=lambda: None),
                                 torch.zeros(4, bucket, dtype=torch.long), torch.zeros(cap, 3 + run.max_blocks, dtype=torch.int32),
                                 torch.zeros(4, bucket, dtype=torch.long), torch.zeros(cap, 3 + run.max_blocks, dtype=torch.int32),
                                 meta, torch.zeros(bucket, eng.model_cfg.hidden_size), None)
    run.graphs[bucket] = fake
    run.token_buckets = [bucket]

    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 250, (n,), generator=gen).tolist() for n in (20, 9, 40, 5)]
    names = ["a0001", None, "a0002", "a0001"]
    for p, a in zip(prompts, names):
        eng.add_request(p, params, a)
    eng.preload(["a0001", "a0002"])
    for _ in range(3):  # a few eager steps: prefills done, some decoding
        eng.step()
    reqs = list(eng.requests.values())
    # the step to pack: two decode tokens, a 6-token chunk continuing a cached prefix, a 1-token decode of
    # the base request; blocks are allocated as the scheduler would
    scheduled = [(reqs[0], 1), (reqs[1], 1), (reqs[2], 1), (reqs[3], 1)]
    reqs[2].num_computed -= 6
    scheduled[2] = (reqs[2], 7)
    # a pipelined step (engine.py): reqs[3]'s last token was sampled on the device in row 5 of the
    # previous step and is still PENDING on the host; the graph's inputs name that row
    true_last = reqs[3].output_ids[-1]
    reqs[3].output_ids[-1] = PENDING
    reqs[3].pending, reqs[3].pending_idx = 1, 5
    run.sampled[5] = true_last
    for r, n in scheduled:
        eng.blocks.allocate(r, r.num_computed + n)

    slot_of = eng.cache.slot_of.__getitem__

    def slot(item):
        return -1 if item[0].adapter is None else slot_of(item[0].adapter)

    items = sorted(scheduled, key=slot)
    num_tokens = sum(n for _, n in items)
    samplers, _ = run._execute_graph(items, slot, num_tokens)

    q_lens = [n for _, n in items]
    kv_lens = [r.num_computed + n for r, n in items]
    tables = [r.block_table for r, _ in items]
    want = AttentionMetadata.build(q_lens, kv_lens, tables, run.block_size, None, torch.device("cpu"), varlen=True)
    host = fake.host.numpy()
    assert np.array_equal(host[2, :num_tokens], want.slot_mapping.numpy()), "KV rows differ from the eager step's"
    assert (host[2, num_tokens:] == run.scratch_row).all(), "padding tokens must write the scratch row"
    ids = [t for r, n in items for t in r.tokens(r.num_computed, r.num_computed + n)]
    pos = [p for r, n in items for p in range(r.num_computed, r.num_computed + n)]
    assert host[0, :num_tokens].tolist() == ids and host[1, :num_tokens].tolist() == pos
    row = ids.index(PENDING)
    assert ids.count(PENDING) == 1 and host[3, row] == 5 and not host[3, :row].any() and not host[3, row + 1 :].any()
    dev_ids = fake.dev[0][:num_tokens].tolist()  # what the graph reads: the PENDING id filled in on the device
    assert dev_ids[row] == true_last and dev_ids[:row] + dev_ids[row + 1 :] == ids[:row] + ids[row + 1 :]
    packed = fake.host_meta.numpy()
    v = want.varlen
    assert v is not None
    s = len(items)
    assert packed[:s, 0].tolist() == v.q_start.tolist()[:s]
    assert packed[:s, 1].tolist() == v.q_len.tolist()[:s] == q_lens
    assert packed[:s, 2].tolist() == v.seq_lens.tolist()[:s] == kv_lens
    for i in range(s):
        need = -(-kv_lens[i] // run.block_size)
        assert packed[i, 3 : 3 + need].tolist() == v.block_tables[i, :need].tolist()
    assert (packed[s:, 1] == 0).all() and (packed[s:, 0] == num_tokens).all(), "padding sequences: no tokens, at the end"
    # LoRA: one segment per adapter run, in slot order; the base request (slot -1) has none
    lens = meta.ints[1].tolist()
    starts = meta.ints[0].tolist()
    slots = meta.ints[2].tolist()
    segs = [(starts[i], starts[i] + lens[i], slots[i]) for i in range(cap) if lens[i] > 0]
    expected, start = [], 0
    for r, n in items:
        sl = slot((r, n))
        if sl >= 0:
            if expected and expected[-1][2] == sl:
                expected[-1] = (expected[-1][0], start + n, sl)
            else:
                expected.append((start, start + n, sl))
        start += n
    assert segs == expected and len(segs) == 2
    assert set(samplers) == {r for r, n in items if r.num_computed + n == r.num_tokens}
    llm.close()
