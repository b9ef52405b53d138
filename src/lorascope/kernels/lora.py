"""Batched LoRA: y += scale[s] * (x @ A[s, :r]^T) @ B[s, :, :r]^T for each token's slot s.

Two functions with one meaning:
- `lora_reference` is the semantics, a per-token loop (slow, obviously right).
- `lora_grouped` is what the engine runs: the batch arrives grouped so that each active slot's
  tokens are one contiguous segment; each active adapter's weights are read once, and the cost is
  sum over active slots of (tokens x rank x (in + out)). Idle slots cost nothing, so the cost
  never depends on how many slots exist (`max_loras`), only on the active adapters and ranks.

Shapes: x [T, in]; y [T, out] (updated in place); A [S, r_max, in]; B [S, out, r_max];
ranks[s] <= r_max (0: the slot has no weights for this module); scales[s] a float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lora_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
    token_slots: Sequence[int],
) -> torch.Tensor:
    """for t, s in enumerate(token_slots): if s >= 0 and ranks[s]: y[t] += scales[s] * B[s,:,:r] @ (A[s,:r] @ x[t])"""
    check_shapes(x, y, a, b)
    for t, s in enumerate(token_slots):
        r = ranks[s] if s >= 0 else 0
        if r:
            y[t] += scales[s] * (b[s, :, :r] @ (a[s, :r] @ x[t]))
    return y


def lora_grouped(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
    segments: Sequence[tuple[int, int, int]],
) -> torch.Tensor:
    """Same as `lora_reference` where tokens start..end-1 of each (start, end, slot) use `slot`.

    Single-token segments (decode steps of adapters with one request in the batch: the common
    case under uniform traffic) go through one gathered bmm pair; longer segments are one matmul
    pair each. Either way each active adapter's weights are read once.
    """
    singles = [(start, slot) for start, end, slot in segments if end - start == 1 and ranks[slot]]
    if len(singles) < _MIN_BATCHED:
        singles = []
    for start, end, slot in segments:
        r = ranks[slot]
        if r == 0 or end - start == 0 or (end - start == 1 and singles):
            continue
        shrunk = (x[start:end] @ a[slot, :r].T) * scales[slot]  # [n, r]
        y[start:end] += shrunk @ b[slot, :, :r].T  # [n, out]
    if singles:
        _batched_singles(x, y, a, b, ranks, scales, singles)
    return y


_MIN_BATCHED = 2


def _batched_singles(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
    singles: list[tuple[int, int]],
) -> None:
    device = x.device
    rows = torch.tensor([row for row, _ in singles], device=device)
    slot_list = [slot for _, slot in singles]
    slots = torch.tensor(slot_list, device=device)
    r_max = max(ranks[s] for s in slot_list)
    # rows past a slot's own rank hold stale weights: the mask zeroes them (and carries the scale)
    rank_t = torch.tensor([ranks[s] for s in slot_list], device=device)
    mask = (torch.arange(r_max, device=device)[None, :] < rank_t[:, None]).to(x.dtype)
    mask *= torch.tensor([scales[s] for s in slot_list], device=device, dtype=x.dtype)[:, None]  # [n, r]
    shrunk = torch.bmm(a[slots, :r_max], x[rows].unsqueeze(-1)).squeeze(-1) * mask  # [n, r]
    y[rows] += torch.bmm(b[slots, :, :r_max], shrunk.unsqueeze(-1)).squeeze(-1)  # [n, out]


def segments_to_token_slots(segments: Sequence[tuple[int, int, int]], num_tokens: int) -> list[int]:
    """The per-token slot list that `lora_reference` takes (-1: no adapter)."""
    slots = [-1] * num_tokens
    for start, end, slot in segments:
        slots[start:end] = [slot] * (end - start)
    return slots


def check_shapes(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """x [T, in], y [T, out], A [S, r_max, in], B [S, out, r_max]: one check for every implementation."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [T, in] and [T, out]")
    if a.shape[2] != x.shape[1] or b.shape[1] != y.shape[1] or a.shape[:2] != (b.shape[0], b.shape[2]):
        raise ValueError(f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit x {tuple(x.shape)}, y {tuple(y.shape)}")
