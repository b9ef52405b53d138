"""Synthetic PEFT adapters for benchmarks: random but deterministic, and sized to change outputs visibly.

Adapter i depends only on (seed, i), never on how many are made, so adapter 5 is the same in a run
of 10 and a run of 1,000, and results over different adapter counts stay comparable.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from lorascope.adapters.peft import write_peft_adapter
from lorascope.model.config import LORA_TARGET_MODULES, ModelConfig
from lorascope.model.weights import init_std, resolve_config

# The LoRA delta's std relative to the base layer's output std: large enough to move the logits
# clearly, small enough that every layer adapted at once does not swamp the base model.
DELTA_TO_BASE = 0.5


def adapter_names(count: int) -> list[str]:
    """a0000, a0001, ...: zero-padded to the width of count - 1, at least 4 digits, so names sort by index."""
    width = max(4, len(str(count - 1)))
    return [f"a{i:0{width}d}" for i in range(count)]


def _b_std(cfg: ModelConfig, module: str, rank: int, scale: float) -> float:
    """sigma_B with scale * sigma_B * sqrt(r) = DELTA_TO_BASE * init_std * sqrt(in).

    For unit-RMS input, A ~ N(0, 1/in) gives A x entries of unit variance, so the delta's std is
    scale * sigma_B * sqrt(r); the base layer's output std is init_std(module) * sqrt(in), with the
    std the random base model draws that module with (model/weights.py).
    """
    fan_in, _ = cfg.module_shape(module)
    return DELTA_TO_BASE * init_std(cfg, module) * math.sqrt(fan_in) / (scale * math.sqrt(rank))


def _generator_seed(seed: int, index: int) -> int:
    # Hashed, so adapter 0 of seed 0 does not replay torch.manual_seed(0)'s stream, which tests and
    # callers commonly draw inputs from (a correlated input would inflate the delta).
    digest = hashlib.blake2b(f"lorascope-synthetic-adapter:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _adapter_weights(
    cfg: ModelConfig, targets: list[str], rank: int, scale: float, seed: int, index: int, dtype: torch.dtype
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    # One generator per adapter, seeded from (seed, index) alone, drawing one flat buffer that the
    # tensors are views of: one normal_ and one cast per adapter, one scaling mul_ per module block.
    gen = torch.Generator().manual_seed(_generator_seed(seed, index))
    layers = cfg.num_hidden_layers
    shapes = {m: cfg.module_shape(m) for m in targets}
    flat = torch.empty(layers * rank * sum(i + o for i, o in shapes.values()), dtype=torch.float32).normal_(generator=gen)
    blocks: list[tuple[str, slice, slice]] = []
    offset = 0
    for module, (fan_in, fan_out) in shapes.items():
        a_end = offset + layers * rank * fan_in
        b_end = a_end + layers * fan_out * rank
        flat[offset:a_end].mul_(1.0 / math.sqrt(fan_in))
        flat[a_end:b_end].mul_(_b_std(cfg, module, rank, scale))
        blocks.append((module, slice(offset, a_end), slice(a_end, b_end)))
        offset = b_end
    flat = flat.to(dtype)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for module, a_part, b_part in blocks:
        fan_in, fan_out = shapes[module]
        a_all, b_all = flat[a_part].view(layers, rank, fan_in), flat[b_part].view(layers, fan_out, rank)
        for layer in range(layers):
            weights[layer, module] = (a_all[layer], b_all[layer])
    return weights


def check_synthetic(
    count: int, rank: int | list[int], targets: list[str], alpha: float | None, base: str
) -> tuple[list[int], list[str]]:
    """Validate make_adapters' / SyntheticSource's arguments; return (ranks to cycle, targets without repeats).
    `base` names the base model in the targets message. Raises ValueError naming the fix."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"adapter count {count!r} is invalid; make at least 1 adapter")
    ranks = [rank] if isinstance(rank, int) else list(rank)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"rank {rank!r} is invalid; give a rank >= 1 or a non-empty list of them")
    unknown = [t for t in targets if t not in LORA_TARGET_MODULES]
    if unknown or not targets:
        raise ValueError(
            f"target modules {unknown or targets!r} are not LoRA targets of {base}; use some of {', '.join(LORA_TARGET_MODULES)}"
        )
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha {alpha!r} is invalid; give a positive number or leave it out for 2 * rank")
    return ranks, list(dict.fromkeys(targets))  # drop repeats, keep order


def synthetic_adapter(
    cfg: ModelConfig, ranks: list[int], targets: list[str], alpha: float | None, seed: int, index: int, dtype: torch.dtype
) -> tuple[int, float, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """Adapter `index`'s (rank, alpha, weights): rank ranks[index % len(ranks)], alpha 2 * rank unless
    given, weights (A [rank, in], B [out, rank] per (layer, module)) from (seed, index) alone. What
    make_adapters writes and SyntheticSource loads; arguments as check_synthetic returns them."""
    r = ranks[index % len(ranks)]
    a = float(2 * r if alpha is None else alpha)
    return r, a, _adapter_weights(cfg, targets, r, a / r, seed, index, dtype)


def make_adapters(
    out: Path,
    model: str,
    count: int,
    rank: int | list[int],
    targets: list[str],
    alpha: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Write `count` PEFT adapters a0000, a0001, ... under `out` for the base model `model` (a preset
    name or an HF directory). A list of ranks cycles: adapter i has rank ranks[i % len(ranks)].
    alpha defaults to 2 * rank (scale 2). Returns the adapter directories in index order."""
    cfg = resolve_config(str(model))
    ranks, targets = check_synthetic(count, rank, targets, alpha, repr(model))
    paths = []
    for index, name in enumerate(adapter_names(count)):
        r, a, weights = synthetic_adapter(cfg, ranks, targets, alpha, seed, index, dtype)
        path = out / name
        write_peft_adapter(path, weights, r, a, targets, base_model_name=str(model))
        paths.append(path)
    return paths
