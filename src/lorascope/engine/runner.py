"""ModelRunner: owns the device tensors (KV cache), turns a scheduled step into one flat batch plus
its metadata, runs the model, and returns the logits of the requests that sample this step.

The flat batch is ordered by adapter slot, so each active adapter's tokens form one contiguous
segment: the LoRA metadata is then a short list of (start, end, slot), built once per step.

On CUDA (with triton) the attention of the whole step, any mix of decode tokens and prefill chunks,
is one Triton kernel (kernels/varlen_attention_triton.py), the elementwise work runs in fused kernels
(kernels/fused_triton.py), q/k/v and gate/up run as one GEMM each (`Decoder.pack_projections`;
LORASCOPE_UNPACKED=1 keeps seven), and every step of at most `max_num_batched_tokens` (capped at 1024) tokens
replays a CUDA graph captured for the smallest token bucket that holds it (vLLM's "capture sizes",
extended to mixed steps; `enforce_eager` turns this off). The graph reads static device buffers that
the step rewrites in place: token ids, positions, KV slot rows, the attention metadata (fixed
capacity: max_num_seqs sequences) and the LoRA metadata (fixed capacity). Padding tokens write their
KV to a scratch row past the pool; padding sequences have no tokens. Nothing in the captured step
syncs with the host; logits of the sampling rows are computed after the replay.

Pipelined steps (engine.py): `sample_greedy` takes the argmax on the device into `sampled` and starts
its copy to the host without waiting; a token still PENDING on the host is read from `sampled` by the
next step on the device (`src`: the row it was sampled in), so the host can build and launch step n+1
while the GPU runs step n. A graph's pinned staging buffers are rewritten only after the copies out of
them that the previous use started have run (an event per graph).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lorascope.engine.request import PENDING, Request
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
        max_num_batched_tokens: int = 1024,
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
        # fused elementwise kernels on the GPU; LORASCOPE_UNFUSED=1 keeps torch's ops (A/B benchmarks)
        model.fused = self.use_triton and not os.environ.get("LORASCOPE_UNFUSED")
        # cuBLASLt's heuristics pick faster kernels for the skinny decode GEMMs (8B shape, M = 32: 3.78 against
        # 3.95 ms a step; benchmarks/RESULTS.md). Process-wide (torch has one setting); LORASCOPE_BLAS=default
        # leaves torch's choice, =cublas forces cuBLAS (A/B benchmarks).
        if self.use_triton and (blas := blas_choice(os.environ.get("LORASCOPE_BLAS"))) != "default":
            torch.backends.cuda.preferred_blas_library(blas)
        # the LoRA shrink beside the base GEMM on a second stream (model/layers.py `_overlapped`);
        # LORASCOPE_LORA_OVERLAP=0 runs it after the GEMM on one stream (A/B benchmarks)
        overlap = os.environ.get("LORASCOPE_LORA_OVERLAP", "1") != "0"
        self.side_stream = torch.cuda.Stream(device) if self.use_triton and store is not None and overlap else None
        if self.use_triton and not os.environ.get("LORASCOPE_UNPACKED"):
            model.pack_projections()  # one GEMM for q/k/v and one for gate/up; before any graph capture
        self.max_num_seqs = max_num_seqs
        top = min(max_num_batched_tokens, GRAPH_BUCKETS[-1])
        self.token_buckets = [b for b in GRAPH_BUCKETS if b < top] + [top]
        self.graphs: dict[int, _StepGraph] = {}
        self.graph_steps = 0  # steps replayed from a graph / run eagerly (benchmarks, tests)
        self.eager_steps = 0
        self._pool: object | None = None
        rows = num_blocks * block_size + (block_size if self.use_triton else 0)
        shape = (rows, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]
        # pipelined steps: the tokens sampled on the device, and two host buffers they are copied to
        self.sampled = torch.zeros(max(1, max_num_seqs), dtype=torch.long, device=device)
        pin = device.type == "cuda"
        self._sampled_host = [torch.zeros(max(1, max_num_seqs), dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._parity = 0
        # TEST-ONLY fault injection (tests/test_verify.py: `lorascope verify` must catch a broken engine):
        # LORASCOPE_TEST_FAULT_SWAP_ADAPTERS=A,B runs adapter A with B's slot and B with A's while both are
        # resident. Read once here; without the variable `execute` is untouched.
        if fault := os.environ.get("LORASCOPE_TEST_FAULT_SWAP_ADAPTERS"):
            a, b = fault.split(",")
            execute, swap = self.execute, {a: b, b: a}

            def faulty(scheduled: list[tuple[Request, int]], slot_of: Callable[[str], int]) -> tuple[list[Request], torch.Tensor | None]:
                def slot(name: str) -> int:
                    try:
                        return slot_of(swap.get(name, name))
                    except KeyError:  # the other adapter is not resident: no swap possible
                        return slot_of(name)

                return execute(scheduled, slot)

            self.execute = faulty  # type: ignore[method-assign]

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

        items = sorted(scheduled, key=slot)
        num_tokens = sum(n for _, n in items)
        if self.use_graphs and items and num_tokens <= self.token_buckets[-1] and len(items) <= self.max_num_seqs:
            self.graph_steps += 1
            return self._execute_graph(items, slot, num_tokens)
        self.eager_steps += 1
        input_ids: list[int] = []
        positions: list[int] = []
        q_lens, kv_lens, tables = [], [], []
        segments: list[tuple[int, int, int]] = []
        sample_rows: list[int] = []
        samplers: list[Request] = []
        src: list[int] = []  # per token: the `sampled` row of a PENDING token (else 0)
        pending = False
        for req, n in items:
            start = len(input_ids)
            input_ids += req.tokens(req.num_computed, req.num_computed + n)
            src += [0] * n
            if input_ids[-1] == PENDING:  # only a decode token can be pending (engine.py)
                src[-1], pending = req.pending_idx, True
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
                                       varlen=self.use_triton)
        ctx = StepContext(attn, self.kv_caches, self._lora_batch(segments) if segments else None, self.side_stream)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        if pending:
            ids = self._fill_pending(ids, torch.tensor(src, dtype=torch.long, device=self.device))
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, ctx)
        if not samplers:
            return [], None
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return samplers, self.model.compute_logits(hidden[rows]).float()

    # --- the CUDA-graph step ---------------------------------------------------------------------

    def _execute_graph(self, items: list[tuple[Request, int]], slot: Callable[[tuple[Request, int]], int],
                       num_tokens: int) -> tuple[list[Request], torch.Tensor | None]:
        """Replay the graph of the smallest token bucket that holds the step (any mix of decode tokens
        and prefill chunks); the step's tensors are written into the graph's static buffers."""
        bucket = next(b for b in self.token_buckets if b >= num_tokens)
        graph = self.graphs.get(bucket) or self._capture(bucket)
        bs = self.block_size
        host = np.zeros((4, bucket), dtype=np.int64)  # ids, positions, KV rows, `sampled` row of a PENDING id
        host[2, num_tokens:] = self.scratch_row
        meta = np.zeros(tuple(graph.host_meta.shape), dtype=np.int32)  # per sequence: q_start, q_len, seq_len, table
        meta[len(items) :, 0] = num_tokens  # padding sequences start at the end of the used tokens
        segments: list[tuple[int, int, int]] = []
        samplers: list[Request] = []
        sample_rows: list[int] = []
        start = 0
        pending = False
        for i, (req, n) in enumerate(items):
            p0 = req.num_computed
            end = start + n
            pos = np.arange(p0, p0 + n)
            table = np.asarray(req.block_table[: -(-(p0 + n) // bs)], dtype=np.int64)
            host[0, start:end] = req.tokens(p0, p0 + n)
            if host[0, end - 1] == PENDING:
                host[3, end - 1], pending = req.pending_idx, True
            host[1, start:end] = pos
            host[2, start:end] = table[pos // bs] * bs + pos % bs
            meta[i, :3] = start, n, p0 + n
            meta[i, 3 : 3 + len(table)] = table
            s = slot((req, n))
            if s >= 0:
                if segments and segments[-1][2] == s:
                    segments[-1] = (segments[-1][0], end, s)
                else:
                    segments.append((start, end, s))
            if p0 + n == req.num_tokens:
                samplers.append(req)
                sample_rows.append(end - 1)
            start = end
        # the copies out of the pinned staging buffers that this graph's last use started must have
        # run before they are rewritten (with pipelined steps that use may still be queued)
        if graph.staged is not None:
            graph.staged.synchronize()
        graph.host.copy_(torch.from_numpy(host))
        graph.host_meta.copy_(torch.from_numpy(meta))
        graph.dev.copy_(graph.host, non_blocking=True)
        graph.dev_meta.copy_(graph.host_meta, non_blocking=True)
        if graph.lora_meta is not None and self.store is not None:
            store = self.store
            graph.lora_meta.update(segments, {m: store.ranks[m] for m in store.modules},
                                   {m: store.scales[m] for m in store.modules})
        if self.device.type == "cuda":
            if graph.staged is None:
                graph.staged = torch.cuda.Event()
            graph.staged.record()
        if pending:
            ids = graph.dev[0]
            ids.copy_(self._fill_pending(ids, graph.dev[3]))
        graph.graph.replay()
        if not samplers:
            return [], None
        rows = torch.tensor(sample_rows, dtype=torch.long).to(self.device, non_blocking=True)
        return samplers, self.model.compute_logits(graph.hidden[rows]).float()

    def _fill_pending(self, ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """PENDING ids replaced, on the device, by the tokens the previous step sampled there."""
        return torch.where(ids == PENDING, self.sampled[src], ids)

    def sample_greedy(self, logits: torch.Tensor) -> SampledTokens:
        """Greedy tokens of `logits` [n, vocab], kept on the device for the next step (`sampled`) and
        copied to the host without waiting; `SampledTokens.tolist()` waits for them."""
        n = logits.shape[0]
        out = self.sampled[:n]
        torch.argmax(logits, dim=-1, out=out)
        host = self._sampled_host[self._parity][:n]  # the buffer of two steps ago: read by then
        self._parity ^= 1
        host.copy_(out, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return SampledTokens(host, event)

    def capture_all(self) -> None:
        """Capture every token bucket now (warm-up), largest first, instead of on first use."""
        if self.use_graphs:
            for bucket in reversed(self.token_buckets):
                if bucket not in self.graphs:
                    self._capture(bucket)

    def _capture(self, bucket: int) -> _StepGraph:
        """Capture the step for `bucket` tokens with padding only (no sequence, every KV row the scratch
        row): the kernels' grids depend on shapes alone, so it replays for any real step that fits."""
        from lorascope.kernels.varlen_attention_triton import VarlenMetadata

        dev = self.device
        cap = min(self.max_num_seqs, bucket)  # a sequence has at least one token
        host = torch.zeros(4, bucket, dtype=torch.long).pin_memory()
        host[2] = self.scratch_row
        host_meta = torch.zeros(cap, 3 + self.max_blocks, dtype=torch.int32).pin_memory()
        dev_buf = host.to(dev)
        dev_meta = host_meta.to(dev)
        varlen = VarlenMetadata(packed=dev_meta, q_start=dev_meta[:, 0], q_len=dev_meta[:, 1], seq_lens=dev_meta[:, 2],
                                block_tables=dev_meta[:, 3:], block_size=self.block_size)
        lora_meta = None
        if self.store is not None:
            from lorascope.kernels.lora_triton import LoRAMeta

            store = self.store
            lora_meta = LoRAMeta.build([], {m: store.ranks[m] for m in store.modules},
                                       {m: store.scales[m] for m in store.modules}, dev, capacity=cap, max_len_bound=bucket)
        attn = AttentionMetadata(slot_mapping=dev_buf[2], varlen=varlen, block_size=self.block_size,
                                 sliding_window=self.model.cfg.sliding_window)
        ctx = StepContext(attn, self.kv_caches, LoRABatch([], kernel_meta=lora_meta) if lora_meta is not None else None,
                          self.side_stream)

        def step() -> torch.Tensor:
            return self.model(dev_buf[0], dev_buf[1], ctx)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (Triton compiles, allocator settles)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader threads page-lock host buffers and synchronize their copy
        # stream while a bucket is captured on first use; under the default ("global") mode those calls
        # invalidate this thread's capture. They touch no stream this capture records.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = step()
        self._pool = graph.pool()
        captured = _StepGraph(graph, host, host_meta, dev_buf, dev_meta, lora_meta, hidden, None)
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


# step sizes (tokens) captured as CUDA graphs, up to max_num_batched_tokens (vLLM's capture sizes,
# extended to mixed steps: a decode batch plus a prefill chunk or two)
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024)


@dataclass(slots=True)
class _StepGraph:
    graph: torch.cuda.CUDAGraph
    host: torch.Tensor  # pinned int64 [4, bucket]: ids, positions, KV rows, `sampled` rows of PENDING ids
    host_meta: torch.Tensor  # pinned int32 [capacity, 3 + max_blocks]: q_start, q_len, seq_len, block table
    dev: torch.Tensor  # the device copies the graph reads
    dev_meta: torch.Tensor
    lora_meta: object | None  # LoRAMeta with the same capacity, max_len_bound = bucket
    hidden: torch.Tensor  # [bucket, hidden] output of the captured step
    staged: torch.cuda.Event | None  # recorded after the last use's copies out of `host`/`host_meta`


@dataclass(slots=True)
class SampledTokens:
    """A step's greedy tokens on their way to the host."""

    host: torch.Tensor
    event: torch.cuda.Event | None

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


BLAS_CHOICES = ("cublaslt", "cublas", "default")


def blas_choice(env: str | None) -> str:
    """LORASCOPE_BLAS (None: cuBLASLt, the engine's choice) checked against what torch accepts."""
    if env is None:
        return "cublaslt"
    if env not in BLAS_CHOICES:
        raise ValueError(f"LORASCOPE_BLAS={env!r} is not a BLAS choice; use one of {', '.join(BLAS_CHOICES)} "
                         "(or unset it for cuBLASLt)")
    return env


def _triton_available() -> bool:
    from lorascope.kernels.lora_triton import HAS_TRITON

    return HAS_TRITON
