"""StepContext: what one forward pass needs besides token ids and positions, built once per step
by the runner and passed down to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorascope.kernels.attention import AttentionMetadata
from lorascope.model.lora import LoRABatch


@dataclass(slots=True)
class StepContext:
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v), each [rows, kv_heads, head_dim]
    lora: LoRABatch | None = None
    # CUDA: a second stream the LoRA shrink runs on while the base GEMM runs (model/layers.py `project`)
    side_stream: torch.cuda.Stream | None = None
