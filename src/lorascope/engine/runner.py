"""ModelRunner: owns the device tensors (KV cache), turns a scheduled step into one flat batch plus
its metadata, runs the model, and returns the logits of the requests that sample this step.

The flat batch is ordered by adapter slot, so each active adapter's tokens form one contiguous
segment: the LoRA metadata is then a short list of (start, end, slot), built once per step.

On CUDA (with triton) decode attention runs in the Triton kernel (decode tokens first in the batch,
each part ordered by slot), and a step made only of decodes replays a CUDA graph captured for the
smallest batch-size bucket that holds it (vLLM's "capture sizes"; `enforce_eager` turns this off).
The graph reads static device buffers that the step rewrites in place: token ids, positions, KV
slot rows, block tables, context lengths and the LoRA metadata (fixed capacity). Padding rows write
their KV to a scratch row past the pool and attend to nothing. Nothing in the captured step syncs
with the host; logits of the real rows are computed after the replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lorascope.engine.request import Request
from lorascope.kernels.attention import AttentionMetadata
from lorascope.model.context import StepContext
from lorascope.model.decoder import Decoder
from lorascope.model.lora import LoRABatch, LoRASlotStore


class ModelRunner:
    def __init__(
        self,
        model: Decoder,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        store: LoRASlotStore | None = None,
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        enforce_eager: bool = False,
    ):
        cfg = model.cfg
        self.model = model
        self.store = store
        self.use_triton = device.type == "cuda" and _triton_available()
        self.device = device
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_row = num_blocks * block_size  # padding rows of a captured step write their KV here
        self.use_graphs = self.use_triton and not enforce_eager
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.graphs: dict[int, _DecodeGraph] = {}
        self._pool: object | None = None
        rows = num_blocks * block_size + (block_size if self.use_triton else 0)
        shape = (rows, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    @torch.inference_mode()
    def execute(
        self, scheduled: list[tuple[Request, int]], slot_of: Callable[[str], int]
    ) -> tuple[list[Request], torch.Tensor | None]:
        """Run one step; returns the requests whose chunk reached their last token, and their
        next-token logits [len, vocab] in float32 (None if no request samples)."""
        def slot(item: tuple[Request, int]) -> int:
            return -1 if item[0].adapter is None else slot_of(item[0].adapter)

        def is_decode(item: tuple[Request, int]) -> bool:
            return item[1] == 1 and item[0].num_computed > 0

        if self.use_graphs and scheduled and len(scheduled) <= self.buckets[-1] and all(map(is_decode, scheduled)):
            return self._execute_graph(sorted(scheduled, key=slot), slot)
        # the Triton decode kernel wants the decode tokens first; each part stays ordered by slot
        items = sorted(scheduled, key=lambda it: (not is_decode(it), slot(it)) if self.use_triton else slot(it))
        input_ids: list[int] = []
        positions: list[int] = []
        q_lens, kv_lens, tables = [], [], []
        segments: list[tuple[int, int, int]] = []
        sample_rows: list[int] = []
        samplers: list[Request] = []
        for req, n in items:
            start = len(input_ids)
            input_ids += req.tokens(req.num_computed, req.num_computed + n)
            positions += range(req.num_computed, req.num_computed + n)
            q_lens.append(n)
            kv_lens.append(req.num_computed + n)
            tables.append(req.block_table)
            s = slot((req, n))
            if s >= 0:
                if segments and segments[-1][2] == s:
                    segments[-1] = (segments[-1][0], start + n, s)
                else:
                    segments.append((start, start + n, s))
            if req.num_computed + n == req.num_tokens:
                sample_rows.append(start + n - 1)
                samplers.append(req)
        attn = AttentionMetadata.build(q_lens, kv_lens, tables, self.block_size, self.model.cfg.sliding_window, self.device,
                                       triton_decode=self.use_triton)
        ctx = StepContext(attn, self.kv_caches, self._lora_batch(segments) if segments else None)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, ctx)
        if not samplers:
            return [], None
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return samplers, self.model.compute_logits(hidden[rows]).float()

    # --- the CUDA-graph decode step ---------------------------------------------------------------

    def _execute_graph(self, items: list[tuple[Request, int]], slot: Callable[[tuple[Request, int]], int]
                       ) -> tuple[list[Request], torch.Tensor]:
        n = len(items)
        bucket = next(b for b in self.buckets if b >= n)
        graph = self.graphs.get(bucket) or self._capture(bucket)
        bs = self.block_size
        host = np.zeros((4, bucket), dtype=np.int64)
        host[2, n:] = self.scratch_row
        tables = np.zeros((bucket, self.max_blocks), dtype=np.int32)
        segments: list[tuple[int, int, int]] = []
        for i, (req, _) in enumerate(items):
            p = req.num_computed
            table = req.block_table
            used = p // bs + 1
            host[0, i] = req.tokens(p, p + 1)[0]
            host[1, i] = p
            host[2, i] = table[p // bs] * bs + p % bs
            host[3, i] = p + 1
            tables[i, :used] = table[:used]
            s = slot((req, 1))
            if s >= 0:
                if segments and segments[-1][2] == s:
                    segments[-1] = (segments[-1][0], i + 1, s)
                else:
                    segments.append((i, i + 1, s))
        # the pinned staging buffers are rewritten next step only after this step's logits reached
        # the host (sampling), so the asynchronous copies below have finished by then
        graph.host.copy_(torch.from_numpy(host))
        graph.host_tables.copy_(torch.from_numpy(tables))
        graph.dev.copy_(graph.host, non_blocking=True)
        graph.dev_tables.copy_(graph.host_tables, non_blocking=True)
        if graph.lora_meta is not None and self.store is not None:
            store = self.store
            graph.lora_meta.update(segments, {m: store.ranks[m] for m in store.modules},
                                   {m: store.scales[m] for m in store.modules})
        graph.graph.replay()
        return [req for req, _ in items], self.model.compute_logits(graph.hidden[:n]).float()

    def _capture(self, bucket: int) -> _DecodeGraph:
        """Capture the decode step for `bucket` rows (padding rows only: lengths 0, scratch KV row)."""
        dev = self.device
        host = torch.zeros(4, bucket, dtype=torch.long).pin_memory()
        host[2] = self.scratch_row
        host_tables = torch.zeros(bucket, self.max_blocks, dtype=torch.int32).pin_memory()
        dev_buf = host.to(dev)
        dev_tables = host_tables.to(dev)
        lora_meta = None
        if self.store is not None:
            from lorascope.kernels.lora_triton import LoRAMeta

            store = self.store
            lora_meta = LoRAMeta.build([], {m: store.ranks[m] for m in store.modules},
                                       {m: store.scales[m] for m in store.modules}, dev, capacity=bucket, max_len_bound=bucket)
        lens32 = torch.zeros(bucket, dtype=torch.int32, device=dev)
        attn = AttentionMetadata(slot_mapping=dev_buf[2], triton_decode=True, decode_tables=dev_tables,
                                 decode_lens=lens32, block_size=self.block_size, sliding_window=self.model.cfg.sliding_window)
        ctx = StepContext(attn, self.kv_caches, LoRABatch([], kernel_meta=lora_meta) if lora_meta is not None else None)

        def step() -> torch.Tensor:
            lens32.copy_(dev_buf[3])  # int64 -> int32 inside the graph
            return self.model(dev_buf[0], dev_buf[1], ctx)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (Triton compiles, allocator settles)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = step()
        self._pool = graph.pool()
        captured = _DecodeGraph(graph, host, host_tables, dev_buf, dev_tables, lora_meta, hidden)
        self.graphs[bucket] = captured
        return captured

    def _lora_batch(self, segments: list[tuple[int, int, int]]) -> LoRABatch:
        """On CUDA the Triton op's metadata is built here, once per step, for every layer and module."""
        batch = LoRABatch(segments)
        if self.use_triton and self.store is not None:
            from lorascope.kernels.lora_triton import LoRAMeta

            store = self.store
            batch.kernel_meta = LoRAMeta.build(
                segments, {m: store.ranks[m] for m in store.modules}, {m: store.scales[m] for m in store.modules}, self.device
            )
        return batch


# decode batch sizes captured as CUDA graphs (vLLM-style), up to max_num_seqs
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclass(slots=True)
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    host: torch.Tensor  # pinned int64 [4, bucket]: ids, positions, KV rows, lengths
    host_tables: torch.Tensor  # pinned int32 [bucket, max_blocks]
    dev: torch.Tensor  # the device copies the graph reads
    dev_tables: torch.Tensor
    lora_meta: object | None  # LoRAMeta with capacity = bucket
    hidden: torch.Tensor  # [bucket, hidden] output of the captured step


def _triton_available() -> bool:
    from lorascope.kernels.lora_triton import HAS_TRITON

    return HAS_TRITON
