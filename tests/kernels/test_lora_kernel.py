"""The grouped LoRA op computes exactly what the per-token reference says, over a grid."""

from __future__ import annotations

import pytest
import torch

from lorascope.kernels.lora import lora_grouped, lora_reference, segments_to_token_slots


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_slots,active", [(1, 1), (8, 3), (64, 8), (1024, 5)])
@pytest.mark.parametrize("fan_in,fan_out", [(64, 32), (128, 384)])
def test_grouped_matches_reference(dtype: torch.dtype, tol: float, num_slots: int, active: int, fan_in: int, fan_out: int) -> None:
    gen = torch.Generator().manual_seed(num_slots * 7 + active)
    r_max = 16
    a = torch.randn(num_slots, r_max, fan_in, generator=gen).to(dtype)
    b = torch.randn(num_slots, fan_out, r_max, generator=gen).to(dtype)
    ranks = [(8, 16, 4)[i % 3] for i in range(num_slots)]
    scales = [0.5 + i % 4 for i in range(num_slots)]
    chosen = torch.randperm(num_slots, generator=gen)[:active].sort().values.tolist()
    segments, start = [], 0
    for slot in chosen:
        n = int(torch.randint(1, 6, (1,), generator=gen))
        segments.append((start, start + n, slot))
        start += n + 2  # two base-model tokens between segments
    tokens = start
    x = torch.randn(tokens, fan_in, generator=gen).to(dtype)
    y0 = torch.randn(tokens, fan_out, generator=gen).to(dtype)
    ref = lora_reference(x.double(), y0.double().clone(), a.double(), b.double(), ranks, scales, segments_to_token_slots(segments, tokens))
    got = lora_grouped(x, y0.clone(), a, b, ranks, scales, segments)
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol
    base_rows = [t for t, s in enumerate(segments_to_token_slots(segments, tokens)) if s < 0]
    assert torch.equal(got[base_rows], y0[base_rows]), "tokens without an adapter must be untouched"


def test_rank_zero_and_empty_segments_add_nothing() -> None:
    a, b = torch.randn(2, 4, 8), torch.randn(2, 6, 4)
    x, y = torch.randn(3, 8), torch.zeros(3, 6)
    lora_grouped(x, y, a, b, [0, 4], [1.0, 1.0], [(0, 2, 0), (2, 2, 1)])
    assert torch.count_nonzero(y) == 0


def test_reference_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        lora_reference(torch.randn(2, 8), torch.zeros(2, 6), torch.randn(1, 4, 9), torch.randn(1, 6, 4), [4], [1.0], [0, 0])


def test_decode_segments_with_mixed_ranks_and_stale_rows() -> None:
    """Uniform decode: every segment one token. Rows past each slot's rank hold stale weights
    (a previous, larger-rank adapter) and must not leak into the result."""
    gen = torch.Generator().manual_seed(3)
    slots, r_max, fan_in, fan_out = 32, 16, 48, 40
    a = torch.randn(slots, r_max, fan_in, generator=gen)
    b = torch.randn(slots, fan_out, r_max, generator=gen)
    ranks = [(4, 8, 16, 0)[i % 4] for i in range(slots)]
    scales = [0.25 * (1 + i % 5) for i in range(slots)]
    segments = [(i, i + 1, (7 * i) % slots) for i in range(20)]
    x = torch.randn(20, fan_in, generator=gen)
    y0 = torch.randn(20, fan_out, generator=gen)
    ref = lora_reference(x.double(), y0.double().clone(), a.double(), b.double(), ranks, scales, segments_to_token_slots(segments, 20))
    got = lora_grouped(x, y0.clone(), a, b, ranks, scales, segments)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6
