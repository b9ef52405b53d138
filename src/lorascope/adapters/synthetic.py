"""Synthetic PEFT adapters for benchmarks: random but deterministic, and sized to change outputs visibly.

Adapter i depends only on (seed, i), never on how many are made, so adapter 5 is the same in a run
of 10 and a run of 1,000, and results over different adapter counts stay comparable.
"""

from __future__ import annotations

import hashlib
import math
import threading
from pathlib import Path

import torch

from lorascope.adapters.peft import write_peft_adapter
from lorascope.model.config import LORA_TARGET_MODULES, ModelConfig
from lorascope.model.weights import init_std, resolve_config

# The LoRA delta's std relative to the base layer's output std: large enough to move the logits
# clearly, small enough that every layer adapted at once does not swamp the base model.
DELTA_TO_BASE = 0.5
_CHUNK = 16_384  # elements per serial piece (_chunks)


def adapter_names(count: int) -> list[str]:
    """a0000, a0001, ...: zero-padded to the width of count - 1, at least 4 digits, so names sort by index."""
    width = max(4, len(str(count - 1)))
    return [f"a{i:0{width}d}" for i in range(count)]


def _b_std(cfg: ModelConfig, module: str, rank: int, scale: float) -> float:
    """sigma_B with scale * sigma_B * sqrt(r) = DELTA_TO_BASE * init_std * sqrt(in).

    For unit-RMS input, A with zero-mean entries of variance 1/in gives A x entries of unit
    variance, so the delta's std is scale * sigma_B * sqrt(r); the base layer's output std is
    init_std(module) * sqrt(in), with the std the random base model draws that module with
    (model/weights.py).
    """
    fan_in, _ = cfg.module_shape(module)
    return DELTA_TO_BASE * init_std(cfg, module) * math.sqrt(fan_in) / (scale * math.sqrt(rank))


def _generator_seed(seed: int, index: int) -> int:
    # Hashed, so adapter 0 of seed 0 does not replay torch.manual_seed(0)'s stream, which tests and
    # callers commonly draw inputs from (a correlated input would inflate the delta).
    digest = hashlib.blake2b(f"lorascope-synthetic-adapter:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _chunks(sizes: list[int]) -> list[int]:
    """`sizes` cut into pieces below TensorIterator's grain (32,768 elements), so that torch runs an
    op on one of them on the calling thread: a loader thread uses one core, not the intra-op pool."""
    return [min(_CHUNK, size - start) for size in sizes for start in range(0, size, _CHUNK)]


_TABLE_SIZE = 1 << 24  # values in a seed's random table (32 MiB of bfloat16), _TABLE_SIZE // _CHUNK pieces
_tables: dict[int, list[torch.Tensor]] = {}
_tables_lock = threading.Lock()


def _table(seed: int) -> list[torch.Tensor]:
    """Seed `seed`'s random table as views of _CHUNK values: bfloat16 integers uniform in [-2^15, 2^15),
    drawn once per process (~0.1 s) and shared by every adapter of that seed and every thread."""
    with _tables_lock:
        table = _tables.get(seed)
        if table is None:
            gen = torch.Generator().manual_seed(_generator_seed(seed, -1))
            bits = torch.empty(_TABLE_SIZE // 4, dtype=torch.int64).random_(-(2**63), None, generator=gen)
            table = _tables[seed] = list(bits.view(torch.int16).to(torch.bfloat16).split(_CHUNK))
        return table


def _draw(sizes: list[int], stds: list[float], seed: int, index: int, out: torch.Tensor) -> None:
    """Fill the flat buffer `out` with uniform values, block i holding sizes[i] values of std stds[i].

    Generating on load must cost the engine little: loads run on loader threads beside the engine's,
    sharing the host's cores and the GIL. A random draw per value cost 57 ms for an 8B q/v rank-16
    adapter on the H200 host, so values come from seed `seed`'s random table instead: the buffer is
    cut into pieces of _CHUNK values (_chunks), and piece p is a table piece with a sign, both drawn
    from (seed, index). That is two memory passes (a copy and a scale, like the copy a real load from
    storage makes) and a handful of torch calls whatever the number of layers (each call re-takes the
    GIL), each running serially on the calling thread. Adapters share table pieces in other places
    and signs, so their weights differ everywhere but are not independent draws: they stand in for
    real adapters in timing and in output checks, not in statistics across adapters. Uniform, like
    PEFT's kaiming-uniform lora_A init; the bound sqrt(3) * std gives the std.
    """
    total = sum(sizes)
    table = _table(seed)
    pieces = _chunks(sizes)
    gen = torch.Generator().manual_seed(_generator_seed(seed, index))
    draws = torch.randint(0, 2 * len(table), (len(pieces),), generator=gen).tolist()
    # a block's last piece is short when its size is not a multiple of _CHUNK: a table piece's head
    src = [table[d >> 1] if n == _CHUNK else table[d >> 1][:n] for n, d in zip(pieces, draws, strict=True)]
    piece_std = [std for size, std in zip(sizes, stds, strict=True) for _ in range(-(-size // _CHUNK))]
    scales = [(1.0 if d & 1 else -1.0) * math.sqrt(3.0) * std / 2**15 for std, d in zip(piece_std, draws, strict=True)]
    values = torch.empty(total, dtype=torch.bfloat16) if out.dtype != torch.bfloat16 else out
    dst = values.split(pieces)
    torch._foreach_copy_(dst, src)
    torch._foreach_mul_(dst, scales)
    if values is not out:  # the bfloat16 values, exactly
        torch._foreach_copy_(out.split(pieces), dst)


def _adapter_weights(
    cfg: ModelConfig,
    targets: list[str],
    rank: int,
    scale: float,
    seed: int,
    index: int,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    # One fill per adapter (_draw), from (seed, index) alone, into one flat buffer that every tensor is
    # a view of. The values are bfloat16 numbers whatever `dtype` is (exact in float32), so a float32
    # file read back in bfloat16 equals a bfloat16 load, and a bfloat16 load is generated in place.
    layers = cfg.num_hidden_layers
    shapes = {m: cfg.module_shape(m) for m in targets}
    sizes = [n for fan_in, fan_out in shapes.values() for n in (layers * rank * fan_in, layers * fan_out * rank)]
    stds = [s for m, (fan_in, _) in shapes.items() for s in (1.0 / math.sqrt(fan_in), _b_std(cfg, m, rank, scale))]
    flat = torch.empty(sum(sizes), dtype=dtype, pin_memory=pin_memory)
    _draw(sizes, stds, seed, index, flat)
    parts = flat.split(sizes)
    per_module: dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
    for i, (module, (fan_in, fan_out)) in enumerate(shapes.items()):
        # unbind: a module's per-layer views in one call (indexing layer by layer would be a call each)
        per_module[module] = (
            parts[2 * i].view(layers, rank, fan_in).unbind(),
            parts[2 * i + 1].view(layers, fan_out, rank).unbind(),
        )
    # read_peft_adapter's order: (layer, module) sorted
    return {
        (layer, m): (per_module[m][0][layer], per_module[m][1][layer])
        for layer in range(layers)
        for m in sorted(per_module)
    }


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
    cfg: ModelConfig,
    ranks: list[int],
    targets: list[str],
    alpha: float | None,
    seed: int,
    index: int,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> tuple[int, float, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """Adapter `index`'s (rank, alpha, weights): rank ranks[index % len(ranks)], alpha 2 * rank unless
    given, weights (A [rank, in], B [out, rank] per (layer, module), in (layer, module) order) from
    (seed, index) alone, as views of one buffer (in page-locked memory with `pin_memory`). What
    make_adapters writes and SyntheticSource loads; arguments as check_synthetic returns them."""
    r = ranks[index % len(ranks)]
    a = float(2 * r if alpha is None else alpha)
    return r, a, _adapter_weights(cfg, targets, r, a / r, seed, index, dtype, pin_memory)


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
