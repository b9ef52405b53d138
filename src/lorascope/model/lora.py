"""Device-side LoRA state: the slot store (weights of the adapters resident on the device) and the
per-step LoRA batch (which contiguous token segment uses which slot).

The store holds, for every layer and target module, A [max_loras, max_rank, in] and
B [max_loras, out, max_rank]; a slot's rank and scale per module are kept on the host so the
grouped op reads only the rows an adapter really has. Which adapter sits in which slot is the
adapter cache's business (adapters/cache.py); this file only stores and clears weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lorascope.model.config import LORA_TARGET_MODULES, ModelConfig


@dataclass(slots=True)
class LoRABatch:
    """Per-step LoRA metadata, built once per step and read by every LoRA layer."""

    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, slot)
    kernel_meta: Any = None  # on CUDA: the Triton op's per-step metadata (kernels/lora_triton.LoRAMeta)

    @property
    def active_slots(self) -> list[int]:
        return [slot for _, _, slot in self.segments]


@dataclass(slots=True)
class HostAdapter:
    """One adapter's weights in the engine's layout, on the host (A [r, in], B [out, r] per module)."""

    name: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A, B)
    scales: dict[str, float]  # module -> alpha / r (or alpha / sqrt(r) with rslora)
    rank: int

    @property
    def size_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @property
    def modules(self) -> set[str]:
        return {module for _, module in self.weights}


class LoRASlotStore:
    def __init__(
        self,
        cfg: ModelConfig,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        modules: tuple[str, ...] = LORA_TARGET_MODULES,
    ):
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.modules = modules
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(cfg.num_hidden_layers):
            for module in modules:
                fan_in, fan_out = cfg.module_shape(module)
                self.a[layer, module] = torch.zeros(max_loras, max_rank, fan_in, dtype=dtype, device=device)
                self.b[layer, module] = torch.zeros(max_loras, fan_out, max_rank, dtype=dtype, device=device)
        # host-side per-module lists, indexed by slot: rank 0 means "no weights here"
        self.ranks: dict[str, list[int]] = {m: [0] * max_loras for m in LORA_TARGET_MODULES}
        self.scales: dict[str, list[float]] = {m: [0.0] * max_loras for m in LORA_TARGET_MODULES}

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def write(self, slot: int, adapter: HostAdapter, non_blocking: bool = False) -> None:
        """Copy an adapter into a slot. The caller guarantees no running step reads this slot."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank} > max_lora_rank {self.max_rank}")
        extra = adapter.modules - set(self.modules)
        if extra:
            raise ValueError(
                f"adapter {adapter.name!r} targets {sorted(extra)}, which the engine holds no slots for; "
                f"add them to lora_target_modules (now {list(self.modules)})"
            )
        self.clear(slot)
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for (layer, module), (a, b) in adapter.weights.items():
            r = a.shape[0]
            dst += [self.a[layer, module][slot, :r], self.b[layer, module][slot, :, :r]]
            src += [a, b]
        # one call for every tensor: per-tensor copy_ calls from a loader thread each give up and
        # retake the GIL, and behind a busy engine thread that cost ~1 ms apiece (an 8B-shape q/v
        # adapter is 128 tensors: 165 ms per load measured on the H200, benchmarks/RESULTS.md)
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)
        layers = {layer for layer, _ in self.a}
        for module in adapter.modules:
            rank = next(a.shape[0] for (_, m), (a, _) in adapter.weights.items() if m == module)
            for layer in layers:  # PEFT's layers_to_transform: untouched layers must add nothing
                if (layer, module) not in adapter.weights:
                    self.a[layer, module][slot, :rank].zero_()
            self.ranks[module][slot] = rank
            self.scales[module][slot] = adapter.scales[module]

    def clear(self, slot: int) -> None:
        """Forget a slot. Only the host-side rank changes: stale rows beyond a rank are never read."""
        for module in LORA_TARGET_MODULES:
            self.ranks[module][slot] = 0
            self.scales[module][slot] = 0.0
