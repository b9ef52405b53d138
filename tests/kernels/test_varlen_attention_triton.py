"""The Triton paged attention of a mixed step (kernels/varlen_attention_triton.py) computes what the torch
paths say.

The kernel tests (`test_kernel_*`) run on a CUDA device when there is one. Without one they run on the
CPU under Triton's interpreter: `test_kernels_under_triton_interpreter` starts this file again in a
subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported), selecting them.
References: `reference_varlen_attention` (float64, one sequence at a time) and kernels/attention.py's
`paged_attention` (the engine's torch path: batched decode SDPA + one SDPA per prefill chunk) through
`AttentionMetadata.build`. Caches are NaN outside the sequences' contexts and the sequences' blocks are
shuffled, so reading a wrong row (or a padding table entry) shows as NaN.
"""

from __future__ import annotations

import importlib.util
import json
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
from lorascope.kernels.varlen_attention_triton import (
    HAS_TRITON,
    VarlenMetadata,
    default_block_m,
    default_num_warps,
    default_partition,
    num_tiles,
    paged_varlen_attention,
    reference_varlen_attention,
    update_varlen_metadata,
    varlen_metadata,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[2]

cuda_only = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA device and triton")

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # max abs error (|V| ~ 1)

# (q_len, kv_len): a decode token, a prefill from 0, a chunk after a cached prefix, a sequence's first
# token, a padding sequence in the middle, a long decode, a chunk crossing blocks
MIXED = [(1, 37), (20, 20), (9, 39), (1, 1), (0, 0), (1, 70), (17, 50)]


class Case:
    """A step: NaN-poisoned non-contiguous cache, q [T, H, D] (`pad_tokens` tokens of no sequence at the
    end), metadata at `capacity` (padding sequences past the list), padding table entries = `pad_id`
    (default: a spare block, all NaN)."""

    def __init__(
        self,
        gen: torch.Generator,
        dtype: torch.dtype,
        seqs: list[tuple[int, int]],
        heads: int,
        kv_heads: int,
        head_dim: int,
        block_size: int,
        capacity: int | None = None,
        pad_tokens: int = 3,
        max_blocks: int | None = None,
        spare_blocks: int = 3,
        pad_id: int | None = None,
    ) -> None:
        q_lens, kv_lens = [s[0] for s in seqs], [s[1] for s in seqs]
        need = [-(-n // block_size) for n in kv_lens]
        if max_blocks is None:
            max_blocks = max([*need, 1]) + 1
        num_blocks = sum(need) + spare_blocks
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        rows = num_blocks * block_size
        k = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=torch.float64)
        v = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=torch.float64)
        tables, used = [], 0
        for n, nb in zip(kv_lens, need):
            blocks = perm[used : used + nb]
            used += nb
            for p in range(n):
                r = blocks[p // block_size] * block_size + p % block_size
                k[r] = torch.randn(kv_heads, head_dim, generator=gen, dtype=torch.float64)
                v[r] = torch.randn(kv_heads, head_dim, generator=gen, dtype=torch.float64)
            tables.append(blocks)
        self.tokens = sum(q_lens) + pad_tokens
        self.q_lens, self.kv_lens, self.tables = q_lens, kv_lens, tables
        self.block_size, self.head_dim = block_size, head_dim
        on = {"dtype": dtype, "device": DEVICE}
        self.q = torch.randn(self.tokens, heads, head_dim, generator=gen, dtype=torch.float64).to(**on)
        self.k, self.v = k.to(**on), v.to(**on)
        capacity = len(seqs) + 2 if capacity is None else capacity
        self.meta = varlen_metadata(q_lens, kv_lens, tables, block_size, capacity, DEVICE, max_blocks=max_blocks)
        fill = pad_id if pad_id is not None else perm[-1]
        bt = self.meta.block_tables
        for s in range(capacity):
            bt[s, need[s] if s < len(need) else 0 :] = fill

    def args(self, meta: VarlenMetadata | None = None) -> tuple:
        m = self.meta if meta is None else meta
        return (self.q, self.k, self.v, m.q_start, m.q_len, m.seq_lens, m.block_tables)

    def ref(self, scale: float, window: int | None) -> torch.Tensor:
        return reference_varlen_attention(*self.args(), scale, self.block_size, window)

    @property
    def seq_tokens(self) -> int:
        return sum(self.q_lens)


def check(got: torch.Tensor, case: Case, scale: float, window: int | None, dtype: torch.dtype) -> float:
    ref = case.ref(scale, window)
    n = case.seq_tokens
    got = got.double().cpu()
    assert torch.isfinite(got[:n]).all(), "NaN/Inf in the output: a stale row or a padding entry was read"
    err = (got[:n] - ref[:n]).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.2e} (tolerance {TOL[dtype]:.0e})"
    return err


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,dtype,window,block_m",
    [
        (4, 4, 32, 16, torch.float32, None, None),  # MHA (group 1)
        (8, 2, 32, 16, torch.bfloat16, 7, None),  # group 4, sliding window
        (8, 1, 64, 3, torch.float16, None, None),  # group 8, block_size 3
        (8, 2, 32, 3, torch.float32, 5, None),  # window, block_size 3
        (6, 2, 16, 16, torch.bfloat16, None, None),  # group 3 (padded to 4), head_dim 16
        (16, 2, 32, 16, torch.float32, 30, 1),  # group 8, one token per tile
        (4, 2, 32, 8, torch.float16, 1, 32),  # window 1 (the token alone), 32-token tiles
        (8, 2, 32, 16, torch.float32, None, 16),  # 64-row tiles
    ],
)
def test_kernel_mixed_batch_matches_reference(
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    window: int | None,
    block_m: int | None,
) -> None:
    """Decode tokens, prefill chunks from 0 and after a cached prefix, padding sequences (in the middle and
    at the end) and padding tokens, in one launch; padding tokens are left untouched (out given) or zeros
    (out=None)."""
    gen = torch.Generator().manual_seed(heads * 1000 + kv_heads * 100 + head_dim + block_size)
    case = Case(gen, dtype, MIXED, heads, kv_heads, head_dim, block_size)
    scale = head_dim**-0.5
    out = torch.full_like(case.q, float("nan"))
    got = paged_varlen_attention(*case.args(), scale, block_size, window, out=out, block_m=block_m, block_n=16)
    assert got is out, "out is filled in place and returned"
    check(out, case, scale, window, dtype)
    n = case.seq_tokens
    assert torch.isnan(out[n:]).all(), "tokens of no sequence must not be written"
    fresh = paged_varlen_attention(*case.args(), scale, block_size, window, block_m=block_m, block_n=16)
    assert torch.equal(fresh[:n], out[:n])
    assert torch.equal(fresh[n:], torch.zeros_like(fresh[n:])), "out=None: tokens of no sequence are zeros"


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize(
    "partition,block_n,dtype", [(16, 16, torch.float32), (32, 16, torch.bfloat16), (64, 32, torch.float16)]
)
def test_kernel_split_k_partitions(partition: int, block_n: int, dtype: torch.dtype) -> None:
    """Split-K (splits with no work, windows starting mid-split, rows with no position in a split) gives
    the reference's result for prefill chunks and decode tokens alike; block_size 32."""
    gen = torch.Generator().manual_seed(7 + partition + block_n)
    seqs = [(1, 90), (12, 12), (0, 0), (5, 64), (1, 1), (20, 95)]
    case = Case(gen, dtype, seqs, 8, 2, 32, 32, max_blocks=4, pad_tokens=1)
    for window in (None, 1, 50):
        got = paged_varlen_attention(*case.args(), 0.25, 32, window, partition_size=partition, block_n=block_n)
        check(got, case, 0.25, window, dtype)


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("partition", [None, 16])
def test_kernel_sequence_search_and_table_prefetch_change_nothing(partition: int | None) -> None:
    """How a program finds its sequence (one vector load and a count, or a binary search), whether a K/V
    tile's block ids are loaded one tile ahead or gathered from the row held in registers, and whether the
    next tile's K/V is loaded ahead change no arithmetic: the seven variants agree bit for
    bit and with the reference, with padding sequences in the middle and at the end, a window, block_size 3
    (a tile's ids span several blocks, the prefetch crosses block boundaries) and split-K."""
    gen = torch.Generator().manual_seed(11)
    case = Case(gen, torch.float32, MIXED, 8, 2, 32, 3)
    outs = []
    for search in ("vector", "binary"):
        for prefetch in (True, False):
            got = paged_varlen_attention(*case.args(), 0.2, 3, 9, block_n=16, partition_size=partition,
                                         seq_search=search, prefetch_table=prefetch)
            check(got, case, 0.2, 9, torch.float32)
            outs.append(got)
    # the block-table row in registers and the K/V of the next tile loaded ahead: no arithmetic changes either
    for in_regs, prefetch_kv in ((True, False), (False, True), (True, True)):
        got = paged_varlen_attention(*case.args(), 0.2, 3, 9, block_n=16, partition_size=partition,
                                     table_in_registers=in_regs, prefetch_kv=prefetch_kv)
        check(got, case, 0.2, 9, torch.float32)
        outs.append(got)
    for other in outs[1:]:
        assert torch.equal(other, outs[0])
    with pytest.raises(ValueError, match="seq_search"):
        paged_varlen_attention(*case.args(), 0.2, 3, seq_search="linear")


@pytest.mark.gpu
@kernel_test
def test_kernel_auto_split_for_few_programs_and_wide_table() -> None:
    """A few sequences with a table wider than 128 positions: "auto" splits (default_partition) and still
    matches the reference and the single pass."""
    gen = torch.Generator().manual_seed(5)
    case = Case(gen, torch.float32, [(1, 150), (3, 40), (1, 7)], 4, 2, 32, 16, capacity=4, max_blocks=12)
    tiles = num_tiles(case.tokens, 4, default_block_m(case.tokens, 4, 2, 32))
    assert default_partition(tiles, 2, 12 * 16, 64, case.tokens, 4, 32) is not None
    auto = paged_varlen_attention(*case.args(), 0.2, 16)
    check(auto, case, 0.2, None, torch.float32)
    single = paged_varlen_attention(*case.args(), 0.2, 16, partition_size=None)
    assert (auto - single)[: case.seq_tokens].abs().max().item() < 1e-5


@pytest.mark.gpu
@kernel_test
@pytest.mark.parametrize("partition", [None, 16])
def test_kernel_padding_garbage_entries_and_in_place_update(partition: int | None) -> None:
    """Huge block table padding ids are never read; padding sequences (capacity 12 vs 5) leave the
    others bit-identical; bad seq_lens / q_len are clamped, not read past; update_varlen_metadata
    rewrites the same tensors and gives a fresh pack's result."""
    gen = torch.Generator().manual_seed(3)
    seqs = [(1, 23), (6, 6), (0, 0), (2, 41), (1, 9)]
    kw = {"block_m": 4, "block_n": 16, "partition_size": partition}
    wide = Case(gen, torch.float32, seqs, 4, 2, 32, 8, capacity=12, max_blocks=8, pad_id=2**31 - 1)
    got = paged_varlen_attention(*wide.args(), 0.2, 8, **kw)
    check(got, wide, 0.2, None, torch.float32)
    tight = varlen_metadata(wide.q_lens, wide.kv_lens, wide.tables, 8, len(seqs), DEVICE, max_blocks=8)
    alone = paged_varlen_attention(*wide.args(tight), 0.2, 8, **kw)
    assert torch.equal(alone, got), "padding sequences must not disturb the other sequences"

    # in place: a different mix in the same buffers (the CUDA-graph pattern)
    meta = wide.meta
    ptrs = [t.data_ptr() for t in (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)]
    order = [3, 0, 4]
    update_varlen_metadata(meta, [wide.q_lens[i] for i in order], [wide.kv_lens[i] for i in order],
                           [wide.tables[i] for i in order])  # fmt: skip
    assert ptrs == [t.data_ptr() for t in (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)]
    fresh = varlen_metadata([wide.q_lens[i] for i in order], [wide.kv_lens[i] for i in order],
                            [wide.tables[i] for i in order], 8, 12, DEVICE, max_blocks=8)  # fmt: skip
    a = paged_varlen_attention(*wide.args(meta), 0.2, 8, **kw)
    b = paged_varlen_attention(*wide.args(fresh), 0.2, 8, **kw)
    assert torch.equal(a[:4], b[:4])
    ref = reference_varlen_attention(*wide.args(fresh), 0.2, 8)
    assert (a[:4].double().cpu() - ref[:4]).abs().max().item() < 1e-5

    # bad values: seq_len past the table is clamped (a full-table sequence equals its clamped self);
    # q_len past the tokens is clamped to them; q_len > seq_len gives zeros at negative positions
    full = Case(gen, torch.float32, [(3, 32)], 4, 2, 32, 8, capacity=1, max_blocks=4, pad_tokens=0)
    base = paged_varlen_attention(*full.args(), 0.2, 8, **kw)
    m = full.meta
    over = paged_varlen_attention(full.q, full.k, full.v, m.q_start, m.q_len + 100, m.seq_lens + 1000,
                                  m.block_tables, 0.2, 8, **kw)  # fmt: skip
    assert torch.equal(over, base)
    neg = paged_varlen_attention(full.q, full.k, full.v, m.q_start, m.q_len, m.seq_lens - 31, m.block_tables,
                                 0.2, 8, **kw)  # fmt: skip
    assert torch.equal(neg[:2], torch.zeros_like(neg[:2])) and torch.isfinite(neg).all()


@pytest.mark.gpu
@kernel_test
def test_kernel_matches_engine_torch_path() -> None:
    """Same numbers as kernels/attention.py's `paged_attention` (AttentionMetadata.build: batched decode
    SDPA + a masked SDPA per prefill chunk), with and without a sliding window, head_dim 128, block 16."""
    gen = torch.Generator().manual_seed(11)
    block_size, heads, kv_heads, head_dim = 16, 8, 2, 128
    seqs = [(1, 2), (1, 37), (24, 24), (10, 45), (1, 17), (5, 5)]
    for dtype in (torch.float32, torch.bfloat16):
        case = Case(gen, dtype, seqs, heads, kv_heads, head_dim, block_size, pad_tokens=0)
        k, v = torch.nan_to_num(case.k), torch.nan_to_num(case.v)  # the torch path's gather pads with row 0
        for window in (None, 24, 4):
            meta = AttentionMetadata.build(
                case.q_lens, case.kv_lens, case.tables, block_size, window, torch.device(DEVICE)
            )
            new_rows = meta.slot_mapping
            ref = paged_attention(case.q, k[new_rows], v[new_rows], k.clone(), v.clone(), meta, head_dim**-0.5)
            got = paged_varlen_attention(*case.args(), head_dim**-0.5, block_size, window)
            err = (got.double() - ref.double()).abs().max().item()
            assert err < TOL[dtype] * 2, f"{dtype} window={window}: max abs error {err:.2e} vs paged_attention"


@pytest.mark.gpu
@kernel_test
def test_kernel_head_dim_256_and_strided_q_out() -> None:
    """head_dim 256 (block_n 32), group 2, q and out as strided views (a fused qkv output)."""
    gen = torch.Generator().manual_seed(13)
    case = Case(gen, torch.float32, [(4, 4), (1, 30)], 4, 2, 256, 16, pad_tokens=1)
    wide = torch.randn(case.tokens, 4, 3 * 256, generator=gen).to(DEVICE)
    wide[:, :, 256:512] = case.q
    out_wide = torch.zeros(case.tokens, 6, 256, device=DEVICE)
    qv = wide[:, :, 256:512]
    m = case.meta
    got = paged_varlen_attention(qv, case.k, case.v, m.q_start, m.q_len, m.seq_lens, m.block_tables, 0.0625, 16,
                                 out=out_wide[:, 1:5])  # fmt: skip
    check(got, case, 0.0625, None, torch.float32)
    assert torch.equal(out_wide[:, 0], torch.zeros_like(out_wide[:, 0]))
    assert torch.equal(out_wide[:, 5], torch.zeros_like(out_wide[:, 5]))


@pytest.mark.gpu
@kernel_test
@pytest.mark.skipif(HAS_CUDA and not INTERPRETED, reason="the dry run's CPU tensors need the interpreter")
def test_kernel_benchmark_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_varlen_attention.py's cells at tiny shapes (checks only) pass."""
    bench = _load_benchmark()
    out = tmp_path / "bench.json"
    assert bench.main(["--out", str(out), "--device", DEVICE, "--dry-run"]) == 0
    assert out.exists()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter)")
def test_probe_dry_run_checks_every_variant(tmp_path: Path) -> None:
    """benchmarks/gpu_kernel_probe.py --dry-run (tiny shapes, interpreter): every attention and LoRA variant
    it would time on the device runs and agrees with the default / the reference, so no device time goes to
    a broken variant."""
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernel_probe.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["failures"] == []
    kinds = [r["kernel"] for r in data["rows"]]
    assert kinds.count("attention") >= 15 and kinds.count("lora_qv") >= 10, kinds
    assert any(r.get("table_in_registers") and r.get("prefetch_kv") for r in data["rows"])


@pytest.mark.gpu
@cuda_only
def test_gpu_cuda_graph_capture_and_replay_mixed_steps() -> None:
    """Capture one call at a token bucket (T = 64, capacity 16), rewrite q and the metadata in place
    (update_varlen_metadata) with different mixes, replay; no host sync inside the call; with and
    without split-K."""
    gen = torch.Generator().manual_seed(19)
    tokens, capacity, heads, kv_heads, head_dim, block_size, max_blocks = 64, 16, 32, 8, 128, 16, 64
    num_blocks = capacity * max_blocks
    k = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    q = torch.zeros(tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros_like(q)
    meta = varlen_metadata([], [], [], block_size, capacity, "cuda", max_blocks=max_blocks)
    for window, partition in ((None, "auto"), (300, 128)):  # the single pass; split-K + reduce
        call_args = (q, k, v, meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables, head_dim**-0.5, block_size)
        kw = {"out": out, "partition_size": partition}
        paged_varlen_attention(*call_args, window, **kw)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():  # "a prototype feature" warning (an error under pytest's filters)
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside the call raises
        try:
            with torch.cuda.graph(graph):
                paged_varlen_attention(*call_args, window, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        mixes = [
            [(1, 1000), (1, 3), (40, 40), (1, 512), (7, 1024)],  # decode + prefill + a cached chunk
            [(1, int(n)) for n in torch.randint(1, max_blocks * block_size, (16,), generator=gen)],  # all decode
            [(64, 900)],  # one chunk filling the bucket
            [(3, 3), (0, 0), (1, 77)],
        ]
        for mix in mixes:
            q_lens, kv_lens = [m[0] for m in mix], [m[1] for m in mix]
            tables = [torch.randperm(num_blocks, generator=gen)[:max_blocks].tolist() for _ in mix]
            update_varlen_metadata(meta, q_lens, kv_lens, tables)
            q.copy_(torch.randn(tokens, heads, head_dim, generator=gen))
            out.fill_(0)
            graph.replay()
            torch.cuda.synchronize()
            ref = reference_varlen_attention(*call_args[:7], head_dim**-0.5, block_size, window)
            n = sum(q_lens)
            err = (out[:n].double().cpu() - ref[:n]).abs().max().item()
            assert err < TOL[torch.bfloat16], f"mix {mix} window {window}: replay error {err:.2e}"
            assert torch.equal(out[n:], torch.zeros_like(out[n:])), "tokens of no sequence were written"
        del graph


@pytest.mark.gpu
@cuda_only
def test_gpu_llama_shape_long_contexts_and_splits() -> None:
    """8B attention shape, bf16, long contexts: the default, the single pass and split-K agree with the
    reference, with and without a window; forced block_m 1..16."""
    gen = torch.Generator().manual_seed(23)
    seqs = [(1, 1000), (1, 3), (128, 512), (1, 2047), (0, 0), (200, 256), (1, 256)]
    case = Case(gen, torch.bfloat16, seqs, 32, 8, 128, 16, max_blocks=128, spare_blocks=1)
    scale = 128**-0.5
    for window in (None, 700):
        check(paged_varlen_attention(*case.args(), scale, 16, window), case, scale, window, torch.bfloat16)
        for partition in (None, 64, 512):
            for block_m in (1, 4, 16):
                got = paged_varlen_attention(*case.args(), scale, 16, window, partition_size=partition, block_m=block_m)
                check(got, case, scale, window, torch.bfloat16)


def test_metadata_packs_and_updates_in_place() -> None:
    meta = varlen_metadata([1, 5, 0, 2], [10, 5, 0, 33], [[4, 9], [7], [], [1, 2, 3]], 16, 6, "cpu")
    assert meta.q_start.tolist() == [0, 1, 6, 6, 8, 8]
    assert meta.q_len.tolist() == [1, 5, 0, 2, 0, 0]
    assert meta.seq_lens.tolist() == [10, 5, 0, 33, 0, 0]
    assert meta.block_tables.tolist() == [[4, 0, 0], [7, 0, 0], [0, 0, 0], [1, 2, 3], [0, 0, 0], [0, 0, 0]]
    assert all(t.dtype == torch.int32 for t in (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables))
    assert (meta.capacity, meta.max_blocks) == (6, 3) and meta.packed.shape == (6, 6)
    assert meta.q_len.data_ptr() == meta.packed.data_ptr() + 4, "views of the one packed tensor"
    ptr = meta.block_tables.data_ptr()
    update_varlen_metadata(meta, [3], [40], [[5, 6, 8]])
    assert meta.block_tables.data_ptr() == ptr
    assert meta.q_start.tolist() == [0, 3, 3, 3, 3, 3] and meta.q_len.tolist() == [3, 0, 0, 0, 0, 0]
    assert meta.seq_lens.tolist() == [40, 0, 0, 0, 0, 0] and meta.block_tables[0].tolist() == [5, 6, 8]
    with pytest.raises(ValueError, match="capacity"):
        update_varlen_metadata(meta, [1] * 7, [1] * 7, [[0]] * 7)
    with pytest.raises(ValueError, match="max_blocks"):
        update_varlen_metadata(meta, [1], [49], [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="q_len"):
        varlen_metadata([3], [2], [[0]], 16, 1, "cpu")
    with pytest.raises(ValueError, match="table has"):
        varlen_metadata([1], [20], [[0]], 16, 1, "cpu")


def test_defaults_depend_on_shapes_only() -> None:
    # 16-row tiles (the decode kernel's program) up to 8 tokens per sequence on average; else 64 rows
    assert default_block_m(256, 256, 4, 128) == 4
    assert default_block_m(510, 256, 4, 128) == 4
    assert default_block_m(158, 32, 4, 128) == 4  # 30 decode tokens + a 128-token chunk (measured faster)
    assert default_block_m(256, 32, 4, 128) == 4
    assert default_block_m(257, 32, 4, 128) == 16
    assert default_block_m(2048, 1, 4, 128) == 16
    assert default_block_m(2048, 1, 8, 128) == 8
    assert default_block_m(2048, 1, 1, 256) == 32
    assert default_block_m(64, 64, 32, 128) == 1
    assert num_tiles(256, 256, 4) == 320
    assert default_num_warps(128, 64, 16) == 4  # 16-row tiles: 4 warps
    assert default_num_warps(128, 64, 64) == 8
    assert default_num_warps(64, 64, 64) == 4
    # split-K only with fewer programs than SMs and a table wider than 128 positions
    assert default_partition(num_tiles(256, 256, 4), 8, 4096, 64, 256, 32, 128) is None
    assert default_partition(num_tiles(4, 4, 4), 8, 4096, 64, 4, 32, 128) == 128
    assert default_partition(num_tiles(4, 4, 4), 8, 128, 64, 4, 32, 128) is None
    # partials capped at 64 MiB: 100 tokens x 32 heads x 130 floats = 1.66 MB per split -> 40 splits
    p = default_partition(num_tiles(100, 1, 16), 8, 131072, 64, 100, 32, 128)
    assert p is not None and p % 64 == 0 and -(-131072 // p) <= 40


@pytest.mark.skipif(not HAS_TRITON, reason="import triton failed")
def test_op_rejects_bad_inputs_before_launching() -> None:
    q, k = torch.randn(4, 4, 32), torch.randn(64, 2, 32)
    meta = varlen_metadata([4], [4], [[0]], 16, 2, "cpu")
    args = (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)
    with pytest.raises(ValueError, match="do not fit"):
        paged_varlen_attention(torch.randn(4, 3, 32), k, k, *args, 1.0, 16)
    with pytest.raises(ValueError, match="power of two"):
        paged_varlen_attention(torch.randn(4, 4, 48), torch.randn(64, 2, 48), torch.randn(64, 2, 48), *args, 1.0, 16)
    with pytest.raises(ValueError, match="one dtype"):
        paged_varlen_attention(q, k.half(), k.half(), *args, 1.0, 16)
    with pytest.raises(ValueError, match="block_tables"):
        paged_varlen_attention(q, k, k, *args[:3], meta.block_tables.long(), 1.0, 16)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_varlen_attention(q, k, k, *args[:2], meta.seq_lens[:1], args[3], 1.0, 16)
    with pytest.raises(ValueError, match="q_start"):
        paged_varlen_attention(q, k, k, meta.q_start.long(), *args[1:], 1.0, 16)
    with pytest.raises(ValueError, match="out must be"):
        paged_varlen_attention(q, k, k, *args, 1.0, 16, out=torch.empty(4, 4, 16))
    with pytest.raises(ValueError, match="multiple of block_n"):
        paged_varlen_attention(q, k, k, *args, 1.0, 16, partition_size=40)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_varlen_attention(q, k, k, *args, 1.0, 16, sliding_window=0)
    with pytest.raises(ValueError, match="block_m"):
        paged_varlen_attention(q, k, k, *args, 1.0, 16, block_m=3)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "gpu_varlen_attention", ROOT / "benchmarks" / "gpu_varlen_attention.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_cells_have_the_asked_shapes() -> None:
    """The benchmark's five cells (full size): token counts, sequence mixes, decode-first order."""
    bench = _load_benchmark()
    cells = {c.name: c for c in bench.cells(dry_run=False)}
    assert list(cells) == ["a_32dec_ctx256", "b_256dec_ctx256", "c_254dec_2x128pre", "d_30dec_1x128pre", "e_1x2048pre"]
    expect = {
        "a_32dec_ctx256": ([1] * 32, [256] * 32),
        "b_256dec_ctx256": ([1] * 256, [256] * 256),
        "c_254dec_2x128pre": ([1] * 254 + [128, 128], [256] * 254 + [128, 128]),
        "d_30dec_1x128pre": ([1] * 30 + [128], [256] * 30 + [128]),
        "e_1x2048pre": ([2048], [2048]),
    }
    for name, (q_lens, kv_lens) in expect.items():
        assert (cells[name].q_lens, cells[name].kv_lens) == (q_lens, kv_lens), name
        assert cells[name].tokens == sum(q_lens)
    small = bench.cells(dry_run=True)
    assert len(small) == 5 and all(sum(c.q_lens) == c.tokens for c in small)
    assert bench.parse_args(["--out", "x.json"]).device == "cuda"


@pytest.mark.skipif(
    not HAS_TRITON,
    reason="import triton failed: install it (pip install --no-deps triton) to run the interpreter tests",
)
@pytest.mark.skipif(INTERPRETED or HAS_CUDA, reason="inside the interpreter run, or the kernels run natively on CUDA")
def test_kernels_under_triton_interpreter() -> None:
    """Run every test_kernel_* above on the CPU through Triton's interpreter, in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_kernel_", str(Path(__file__))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"interpreter run failed after {elapsed:.0f} s:\n{tail}"
    assert " passed" in tail and "skipped" not in tail, f"the interpreter run skipped tests:\n{tail}"
