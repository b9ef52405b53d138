"""The Triton paged decode attention (kernels/attention_triton.py) computes what the torch paths say.

The kernel tests (`test_kernel_*`) run on a CUDA device when there is one. Without one they run on the
CPU under Triton's interpreter: `test_kernels_under_triton_interpreter` starts this file again in a
subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported), selecting them.
References: `reference_decode_attention` (float64, one sequence at a time) and kernels/attention.py's
`paged_attention` decode path (the engine's torch path) through `AttentionMetadata.build`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from _kernel_marks import kernel_test
from lorascope.kernels.attention import AttentionMetadata, paged_attention
from lorascope.kernels.attention_triton import (
    HAS_TRITON,
    default_partition,
    paged_decode_attention,
    reference_decode_attention,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"

cuda_only = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA device and triton")

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # max abs error (|V| ~ 1)


def make_case(gen: torch.Generator, dtype: torch.dtype, seq_lens: list[int], heads: int, kv_heads: int,
              head_dim: int, block_size: int, max_blocks: int | None = None, spare_blocks: int = 5,
              pad_id: int | None = None):
    """A cache whose every row not in some sequence's context is NaN (reading one poisons the result),
    the sequences' blocks drawn from a shuffled pool (non-contiguous), block table padding either a
    valid-looking id or `pad_id` (e.g. a huge garbage id)."""
    need = [-(-n // block_size) for n in seq_lens]
    if max_blocks is None:
        max_blocks = max([*need, 1]) + 1
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    rows = num_blocks * block_size
    k = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=torch.float64)
    v = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=torch.float64)
    tables, used = [], 0
    for n, nb in zip(seq_lens, need):
        blocks = perm[used : used + nb]
        used += nb
        for p in range(n):
            r = blocks[p // block_size] * block_size + p % block_size
            k[r] = torch.randn(kv_heads, head_dim, generator=gen, dtype=torch.float64)
            v[r] = torch.randn(kv_heads, head_dim, generator=gen, dtype=torch.float64)
        fill = [pad_id if pad_id is not None else perm[-1]] * (max_blocks - nb)
        tables.append(blocks + fill)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen, dtype=torch.float64)
    on = {"dtype": dtype, "device": DEVICE}
    bt = torch.tensor(tables, dtype=torch.int32, device=DEVICE).reshape(len(seq_lens), max_blocks)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q.to(**on), k.to(**on), v.to(**on), bt, sl


def check(got: torch.Tensor, q, k, v, bt, sl, scale: float, block_size: int, window: int | None,
          dtype: torch.dtype) -> float:
    ref = reference_decode_attention(q, k, v, bt, sl, scale, block_size, window)
    got = got.double().cpu()
    assert torch.isfinite(got).all(), "NaN/Inf in the output: a stale row or a padding entry was read"
    err = (got - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.2e} (tolerance {TOL[dtype]:.0e})"
    return err


def random_lens(gen: torch.Generator, batch: int, hi: int = 70) -> list[int]:
    return torch.randint(1, hi + 1, (batch,), generator=gen).tolist()


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("kv_heads,heads", [(2, 4), (2, 8), (4, 4)])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_kernel_matches_reference(batch: int, kv_heads: int, heads: int, head_dim: int, block_size: int) -> None:
    """The grid; in each case float32 and bfloat16, one with a sliding window and one without (which
    one alternates over the grid, so each dtype meets both on every axis: half the interpreter time)."""
    seed = batch * 1000 + heads * 100 + kv_heads * 10 + head_dim + block_size
    gen = torch.Generator().manual_seed(seed)
    lens = random_lens(gen, batch)
    if batch > 1:
        lens[0] = 1  # the new token alone
    scale = head_dim**-0.5
    window = int(torch.randint(1, 40, (1,), generator=gen))
    flip = (batch + heads // kv_heads + head_dim // 32 + block_size // 8) % 2
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        case = make_case(gen, dtype, lens, heads, kv_heads, head_dim, block_size)
        w = window if (i + flip) % 2 else None
        out = paged_decode_attention(*case, scale, block_size, w)
        check(out, *case, scale, block_size, w, dtype)


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("partition,block_n,dtype", [(16, 16, torch.float32), (32, 16, torch.bfloat16),
                                                     (64, 64, torch.float16), (None, 16, torch.float32)])
def test_kernel_split_k_partitions(partition: int | None, block_n: int, dtype: torch.dtype) -> None:
    """Flash-decoding: every partition size (splits with no work, windows starting mid-split) gives the
    single pass's result; block_size 32 too."""
    gen = torch.Generator().manual_seed(7 + (partition or 0) + block_n)
    lens = [70, 1, 33, 0, 64, 17]
    case = make_case(gen, dtype, lens, 8, 2, 64, 32, max_blocks=4)
    for w in (None, 1, 50):
        out = paged_decode_attention(*case, 0.125, 32, w, partition_size=partition, block_n=block_n)
        check(out, *case, 0.125, 32, w, dtype)


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("partition", [None, 16])
def test_kernel_padded_slots_and_garbage_table_entries(partition: int | None) -> None:
    """seq_len 0 slots give zeros and leave the other sequences bit-identical; block table padding of
    huge ids (past the cache) is never read; seq_len past the table is clamped, not read past it."""
    gen = torch.Generator().manual_seed(3)
    lens = [23, 0, 9, 0, 41]
    q, k, v, bt, sl = make_case(gen, torch.float32, lens, 4, 2, 32, 8, max_blocks=8, pad_id=2**31 - 1)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_attention(q, k, v, bt, sl, 0.2, 8, out=out, partition_size=partition, block_n=16)
    assert got is out, "out is filled in place and returned"
    check(out, q, k, v, bt, sl, 0.2, 8, None, torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
    real = [0, 2, 4]
    alone = paged_decode_attention(q[real], k, v, bt[real], sl[real], 0.2, 8, partition_size=partition, block_n=16)
    assert torch.equal(alone, out[real]), "padded slots must not disturb the other sequences"
    # negative and too-long seq_lens: clamped to [0, max_blocks * block_size]; the row read is that of
    # a context filling the whole table, whose entries here are garbage for the short ones, so only
    # check that a full-table sequence of valid blocks matches its clamped self
    full = make_case(gen, torch.float32, [32], 4, 2, 32, 8, max_blocks=4)
    over = full[4] + 1000
    a = paged_decode_attention(*full[:4], over, 0.2, 8, partition_size=partition, block_n=16)
    b = paged_decode_attention(*full, 0.2, 8, partition_size=partition, block_n=16)
    assert torch.equal(a, b)
    neg = paged_decode_attention(*full[:4], full[4] - 1000, 0.2, 8, partition_size=partition, block_n=16)
    assert torch.equal(neg, torch.zeros_like(neg))


@pytest.mark.gpu
@kernel_test
def test_kernel_matches_engine_torch_path() -> None:
    """Same numbers as kernels/attention.py's `paged_attention` decode path (AttentionMetadata.build),
    with and without a sliding window, bfloat16, head_dim 128, block_size 16."""
    gen = torch.Generator().manual_seed(11)
    block_size, heads, kv_heads, head_dim = 16, 8, 2, 128
    lens = [2, 37, 70, 16, 17]  # the torch path takes decode tokens with a context of >= 2
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, bt, sl = make_case(gen, dtype, lens, heads, kv_heads, head_dim, block_size)
        k, v = torch.nan_to_num(k), torch.nan_to_num(v)  # the torch path's gather pads with row 0
        tables = [row[: -(-n // block_size)] for row, n in zip(bt.tolist(), lens)]
        for window in (None, 24):
            meta = AttentionMetadata.build([1] * len(lens), lens, tables, block_size, window, torch.device(DEVICE))
            new_rows = meta.slot_mapping
            ref = paged_attention(q, k[new_rows], v[new_rows], k.clone(), v.clone(), meta, head_dim**-0.5)
            got = paged_decode_attention(q, k, v, bt, sl, head_dim**-0.5, block_size, window)
            err = (got.double() - ref.double()).abs().max().item()
            assert err < TOL[dtype] * 2, f"{dtype} window={window}: max abs error {err:.2e} vs paged_attention"


@pytest.mark.gpu
@kernel_test
def test_kernel_head_dim_256_group_1_and_strided_q() -> None:
    """head_dim 256 (block_n 32), MHA (group 1), q and out as strided views (a fused qkv output)."""
    gen = torch.Generator().manual_seed(13)
    q, k, v, bt, sl = make_case(gen, torch.float32, [5, 30], 2, 2, 256, 16)
    wide = torch.randn(2, 2, 3 * 256, generator=gen).to(DEVICE)
    wide[:, :, 256:512] = q
    out_wide = torch.zeros(2, 4, 256, device=DEVICE)
    got = paged_decode_attention(wide[:, :, 256:512], k, v, bt, sl, 0.0625, 16, out=out_wide[:, 1:3])
    check(got, q, k, v, bt, sl, 0.0625, 16, None, torch.float32)
    assert torch.equal(out_wide[:, 0], torch.zeros_like(out_wide[:, 0]))


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("partition", [None, "auto", 64])
def test_gpu_cuda_graph_capture_and_replay(partition) -> None:
    """Capture one call with static inputs, rewrite seq_lens / block_tables / q in place, replay."""
    gen = torch.Generator().manual_seed(19)
    batch, heads, kv_heads, head_dim, block_size, max_blocks = 8, 32, 8, 128, 16, 64  # "auto": split-K
    num_blocks = batch * max_blocks
    k = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    q = torch.zeros(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    bt = torch.zeros(batch, max_blocks, device="cuda", dtype=torch.int32)
    sl = torch.zeros(batch, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    kwargs = {"sliding_window": None, "out": out, "partition_size": partition}
    paged_decode_attention(q, k, v, bt, sl, head_dim**-0.5, block_size, **kwargs)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():  # "a prototype feature" warning (an error under pytest's filters)
        warnings.simplefilter("ignore")
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the call raises
    try:
        with torch.cuda.graph(graph):
            paged_decode_attention(q, k, v, bt, sl, head_dim**-0.5, block_size, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for step in range(3):
        lens = torch.randint(1, max_blocks * block_size + 1, (batch,), generator=gen)
        lens[step] = 0  # a padded slot
        tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(batch)])
        q.copy_(torch.randn(batch, heads, head_dim, generator=gen))
        bt.copy_(tables)
        sl.copy_(lens)
        graph.replay()
        torch.cuda.synchronize()
        check(out, q, k, v, bt, sl, head_dim**-0.5, block_size, None, torch.bfloat16)


@pytest.mark.gpu
@cuda_only
def test_gpu_llama_shape_long_context_split_matches_single_pass() -> None:
    gen = torch.Generator().manual_seed(23)
    lens = [1000, 3, 512, 2047, 0, 256]
    case = make_case(gen, torch.bfloat16, lens, 32, 8, 128, 16, max_blocks=128, spare_blocks=0)
    single = paged_decode_attention(*case, 128**-0.5, 16, partition_size=None)
    check(single, *case, 128**-0.5, 16, None, torch.bfloat16)
    for partition in (64, 256, 512):
        split = paged_decode_attention(*case, 128**-0.5, 16, partition_size=partition)
        check(split, *case, 128**-0.5, 16, None, torch.bfloat16)
        check(paged_decode_attention(*case, 128**-0.5, 16, 700, partition_size=partition),
              *case, 128**-0.5, 16, 700, torch.bfloat16)


def test_default_partition_depends_on_shapes_only() -> None:
    assert default_partition(64, 8, 4096, 64) is None  # 512 programs: enough for 132 SMs
    assert default_partition(32, 8, 4096, 64) is None
    assert default_partition(4, 8, 4096, 64) == 128
    assert default_partition(4, 8, 128, 64) is None  # one partition would cover the table anyway


@pytest.mark.skipif(not HAS_TRITON, reason="import triton failed")
def test_op_rejects_bad_inputs_before_launching() -> None:
    q, k = torch.randn(2, 4, 32), torch.randn(64, 2, 32)
    bt, sl = torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        paged_decode_attention(torch.randn(2, 3, 32), k, k, bt, sl, 1.0, 16)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(torch.randn(2, 4, 48), torch.randn(64, 2, 48), torch.randn(64, 2, 48), bt, sl, 1.0, 16)
    with pytest.raises(ValueError, match="one dtype"):
        paged_decode_attention(q, k.half(), k.half(), bt, sl, 1.0, 16)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k, k, bt.long(), sl, 1.0, 16)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, k, k, bt, sl[:1], 1.0, 16)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, k, k, bt, sl, 1.0, 16, out=torch.empty(2, 4, 16))
    with pytest.raises(ValueError, match="multiple of block_n"):
        paged_decode_attention(q, k, k, bt, sl, 1.0, 16, partition_size=40)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, k, k, bt, sl, 1.0, 16, sliding_window=0)


@pytest.mark.skipif(not HAS_TRITON, reason="import triton failed: install it (pip install --no-deps triton) to run the interpreter tests")
@pytest.mark.skipif(INTERPRETED or HAS_CUDA, reason="inside the interpreter run, or the kernels run natively on CUDA")
def test_kernels_under_triton_interpreter() -> None:
    """Run every test_kernel_* above on the CPU through Triton's interpreter, in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_kernel_", str(Path(__file__))],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=900,
    )
    elapsed = time.perf_counter() - start
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"interpreter run failed after {elapsed:.0f} s:\n{tail}"
    assert " passed" in tail and "skipped" not in tail, f"the interpreter run skipped tests:\n{tail}"
