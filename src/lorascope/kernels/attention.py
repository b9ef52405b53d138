"""Paged attention in plain torch, for any mix of decode tokens and prefill chunks.

The KV cache of one layer is two tensors [num_rows, kv_heads, head_dim], one row per token slot
(row = block * block_size + offset). Each step first writes the new tokens' K/V at
`slot_mapping`, then attends:
- decode sequences (one new token each) in one batched SDPA over their gathered context rows;
- each prefill chunk (q_len new tokens after kv_len - q_len cached ones) with its own SDPA.
Causality and the optional sliding window are in the masks built by `AttentionMetadata.build`.

On CUDA the engine uses `varlen=True`: every sequence of the step, decode or prefill, goes to the one
Triton kernel of varlen_attention_triton.py (its int32 metadata in `varlen`), the form a CUDA-graph
captured mixed step reads. With `triton_decode=True` (tests, benchmarks) only the decode sequences go to the Triton kernel of attention_triton.py
instead: their metadata is a block table [Bd, max_blocks] int32 and the context lengths [Bd] int32,
O(blocks) host work instead of O(context) (the padded gather rows), fixed shapes, no host sync: the
form a CUDA-graph-captured decode step reads (engine/runner.py keeps those tensors static).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lorascope.kernels.varlen_attention_triton import VarlenMetadata


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first flat token index of the chunk
    q_len: int
    kv_rows: torch.Tensor  # [kv_len] cache rows of the whole context, new tokens included
    mask: torch.Tensor | None  # [1, 1, q_len, kv_len] bool; None: plain causal from position 0


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache row of each new token
    decode_tokens: torch.Tensor | None = None  # [Bd] flat indices of decode tokens
    decode_kv_rows: torch.Tensor | None = None  # [Bd, Kmax] padded with row 0
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, Kmax] bool
    prefills: list[PrefillChunk] = field(default_factory=list)
    # the Triton decode path (triton_decode=True): decode tokens are the first Bd flat tokens
    triton_decode: bool = False
    decode_tables: torch.Tensor | None = None  # [Bd, max_blocks] int32
    decode_lens: torch.Tensor | None = None  # [Bd] int32, the new token included
    block_size: int = 16
    sliding_window: int | None = None
    varlen: VarlenMetadata | None = None  # the whole step in the varlen kernel (varlen=True)

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        kv_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sliding_window: int | None,
        device: torch.device,
        triton_decode: bool = False,
        varlen: bool = False,
    ) -> AttentionMetadata:
        """Metadata for sequences laid out one after another in the flat batch, in list order.
        With triton_decode, decode sequences (q_len 1, kv_len > 1) must come first."""
        if varlen:
            from lorascope.kernels.varlen_attention_triton import varlen_metadata

            rows = np.concatenate([
                np.asarray(t[: -(-kv // block_size)], dtype=np.int64)[np.arange(kv - q, kv) // block_size] * block_size
                + np.arange(kv - q, kv) % block_size
                for q, kv, t in zip(q_lens, kv_lens, block_tables, strict=True)
            ])
            return cls(slot_mapping=torch.from_numpy(rows).to(device, non_blocking=True), block_size=block_size,
                       sliding_window=sliding_window,
                       varlen=varlen_metadata(q_lens, kv_lens, block_tables, block_size, len(q_lens), device))
        slot_rows: list[int] = []
        decode_tokens: list[int] = []
        decode_rows: list[list[int]] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        start = 0
        for q_len, kv_len, table in zip(q_lens, kv_lens, block_tables, strict=True):
            slot_rows.extend(table[p // block_size] * block_size + p % block_size for p in range(kv_len - q_len, kv_len))
            if q_len == 1 and kv_len > 1:
                if triton_decode:
                    if start != len(decode_lens):
                        raise ValueError("with triton_decode the decode sequences must come first in the batch")
                    decode_tables.append(table[: -(-kv_len // block_size)])
                    decode_lens.append(kv_len)
                else:
                    decode_tokens.append(start)
                    decode_rows.append([table[p // block_size] * block_size + p % block_size for p in range(kv_len)])
            else:
                rows = [table[p // block_size] * block_size + p % block_size for p in range(kv_len)]
                mask = _prefill_mask(q_len, kv_len, sliding_window, device)
                prefills.append(PrefillChunk(start, q_len, torch.tensor(rows, device=device), mask))
            start += q_len
        meta = cls(slot_mapping=torch.tensor(slot_rows, dtype=torch.long, device=device), prefills=prefills,
                   triton_decode=triton_decode, block_size=block_size, sliding_window=sliding_window)
        if decode_lens:
            width = max(map(len, decode_tables))
            tables = np.zeros((len(decode_tables), width), dtype=np.int32)
            for i, t in enumerate(decode_tables):
                tables[i, : len(t)] = t
            meta.decode_tables = torch.from_numpy(tables).to(device, non_blocking=True)
            meta.decode_lens = torch.tensor(decode_lens, dtype=torch.int32, device=device)
        if decode_tokens:
            kmax = max(map(len, decode_rows))
            padded = torch.zeros(len(decode_rows), kmax, dtype=torch.long)
            lens = torch.tensor([len(r) for r in decode_rows])
            for i, r in enumerate(decode_rows):
                padded[i, : len(r)] = torch.tensor(r)
            pos = torch.arange(kmax)
            allowed = pos[None, :] < lens[:, None]
            if sliding_window is not None:
                allowed &= pos[None, :] > (lens[:, None] - 1 - sliding_window)
            meta.decode_tokens = torch.tensor(decode_tokens, device=device)
            meta.decode_kv_rows = padded.to(device)
            meta.decode_mask = allowed[:, None, None, :].to(device)
        return meta


def _prefill_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    if q_len == kv_len and (window is None or window >= kv_len):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed[None, None]


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor | None,  # [T, Hkv, D]; None: the new tokens' K/V are already in the cache
    v: torch.Tensor | None,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [rows, Hkv, D]
    v_cache: torch.Tensor,  # [rows, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    if k is not None and v is not None:
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
    out = torch.empty_like(q)
    if meta.varlen is not None:
        from lorascope.kernels.varlen_attention_triton import paged_varlen_attention

        v = meta.varlen
        return paged_varlen_attention(q, k_cache, v_cache, v.q_start, v.q_len, v.seq_lens, v.block_tables, scale,
                                      meta.block_size, meta.sliding_window, out=out)
    if meta.decode_lens is not None:
        from lorascope.kernels.attention_triton import paged_decode_attention

        bd = meta.decode_lens.shape[0]
        paged_decode_attention(q[:bd], k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale, meta.block_size,
                               meta.sliding_window, out=out[:bd])
    if meta.decode_tokens is not None:
        qd = q[meta.decode_tokens].unsqueeze(2)  # [Bd, H, 1, D]
        kd = k_cache[meta.decode_kv_rows].transpose(1, 2)  # [Bd, Hkv, K, D]
        vd = v_cache[meta.decode_kv_rows].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[meta.decode_tokens] = od.squeeze(2)
    for chunk in meta.prefills:
        end = chunk.start + chunk.q_len
        qp = q[chunk.start : end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        kp = k_cache[chunk.kv_rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, kv, D]
        vp = v_cache[chunk.kv_rows].transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True
        )
        out[chunk.start : end] = op[0].transpose(0, 1)
    return out
