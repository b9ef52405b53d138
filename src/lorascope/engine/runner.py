"""ModelRunner: owns the device tensors (KV cache), turns a scheduled step into one flat batch plus
its metadata, runs the model, and returns the logits of the requests that sample this step.

The flat batch is ordered by adapter slot, so each active adapter's tokens form one contiguous
segment: the LoRA metadata is then a short list of (start, end, slot), built once per step.
"""

from __future__ import annotations

from collections.abc import Callable

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
    ):
        cfg = model.cfg
        self.model = model
        self.store = store
        self.use_triton = device.type == "cuda" and _triton_available()
        self.device = device
        self.block_size = block_size
        rows = num_blocks * block_size
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

        items = sorted(scheduled, key=slot)
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
        attn = AttentionMetadata.build(q_lens, kv_lens, tables, self.block_size, self.model.cfg.sliding_window, self.device)
        ctx = StepContext(attn, self.kv_caches, self._lora_batch(segments) if segments else None)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, ctx)
        if not samplers:
            return [], None
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return samplers, self.model.compute_logits(hidden[rows]).float()

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


def _triton_available() -> bool:
    from lorascope.kernels.lora_triton import HAS_TRITON

    return HAS_TRITON
