"""Grouped LoRA on the GPU: Triton kernels with exactly `lora_grouped`'s meaning (kernels/lora.py).

    y[t] += scale[s] * B[s, :, :r] @ (A[s, :r] @ x[t])   for the tokens t of each segment (start, end, s)

The modules that read the same x (q/k/v, or gate/up) go through one kernel pair together
(`lora_multi_triton`; `lora_grouped_triton` is the one-module case). Both kernels run over flat token
tiles: each segment is cut into tiles of BLOCK_M rows, and the step's tile map (per tile: segment
index, first row within the segment) is built on the host with the rest of the metadata. BLOCK_M is 16
(tl.dot's smallest M) in a capacity-built meta, whose graph may replay an all-decode step: a decode
token is one tile, a 128-token prefill chunk 8. A meta built for one step sizes its tiles by its
shortest segment (next power of two, 16 to 64), so a prefill-only eager step re-reads its adapters'
weights once per 64 rows, not per 16.
1. shrink: u[m, t, :R] = scale_m * x[t] @ A_m[slot, :R]^T, R = r_max padded to a power of two >= 16.
   Grid (module x K split, token tile): every program reads its tile's rows of x and one K chunk (tiles
   of 256) of one module's A[slot]; split-K partials go to their own plane of a float32 buffer
   [M, SPLIT, T, R] (no atomics, no zero-fill: deterministic). Split-K (at most 4, aiming at ~2
   programs per SM) fills the H200's SMs when a decode step has few tiles; without it one program
   per adapter read its 128 KB of A latency-bound (23 us a launch).
2. expand: y_m[t, n] += (sum of the SPLIT planes of u[m, t]) @ B_m[slot, n, :R]^T. Grid (output tile
   over the modules' outputs one after another, token tile): every output element belongs to one token
   and one program, so a plain load-add-store, no atomics.

Grid size. The token-tile axis has one entry per tile the step can have. Segments are disjoint row
ranges of x, so T rows in at most n = min(capacity, T) non-empty segments make at most
n + (T - n) // BLOCK_M tiles (each segment adds one partial tile at most; `grid_tiles`): T = 160 with
capacity 160 gives 160 tiles, T = 1024 with capacity 256 gives 304, where a (capacity x tiles of the
longest segment) grid would have 480 and 4096. Programs past the step's real tile count read that count
and exit at once; they are the only cost of the bound (a mixed T = 160 step of 30 decode tokens and a
128-token chunk has 38 real tiles of the 160). The map costs each program one direct load, where a
binary search over segment starts would cost log2(capacity) dependent loads in every program, and
building it is a few numpy calls over the segments on the host, inside the step's one metadata copy.
Under a graph, 16-row tiles give a decode token a 16-row tile whatever the longest segment the graph may
see, and keep a prefill chunk's rows in parallel programs; each of its tiles re-reads the adapter's
weights, mostly from L2.

Ranks: a slot's rows past its rank hold stale weights. Both kernels load A rows and B columns with the
mask `r < rank` (other=0), so stale rows contribute exact zeros; a tile of rank 0 exits at once. Each
program reads only its own segment's slot: the weights read grow with the active adapters and their
ranks, never with S (the slots in the store).

Metadata: `LoRAMeta.build(segments, ranks_by_module, scales_by_module, device)` packs, once per step,
the segments (start, length, slot), every module's per-segment rank and scale, the tile count and the
tile map into one small device buffer (one host-to-device copy, O(active segments + tiles), never O(S)).
`meta[module]` gives the view the ops take; every layer of that module reuses it. With `capacity=` the
buffer has a fixed size (the tile map room for `capacity` segments of `max_len_bound` tokens), the grid
depends only on it and on x's row count (fixed in a captured graph), and `meta.update(...)` rewrites the
buffer in place: the op then holds no host sync and no shape that changes between steps, so a CUDA graph
captured once replays for any batch within the capacity.

Inputs float32, bfloat16 or float16 (x, y, A, B of one dtype); the dots accumulate in float32 (float32
inputs use IEEE dots, not tf32); u is rounded to the weights' dtype before the expand dot, as torch's
`lora_grouped` rounds its shrunk product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorascope.kernels._triton import HAS_TRITON, tl, triton
from lorascope.kernels._triton import INTERPRETED as _INTERPRETED
from lorascope.kernels._triton import NUM_SMS as _NUM_SMS
from lorascope.kernels._triton import next_pow2 as _next_pow2
from lorascope.kernels.lora import check_shapes

# rows per token tile in a capacity-built (graph) meta: tl.dot's smallest M, as its steps may be all decode
# tokens. A meta built for one step sizes its tiles by its shortest segment, up to _MAX_BLOCK_M
BLOCK_M = 16
_MAX_BLOCK_M = 64
_MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis, where the token tiles go


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_m(shortest: int) -> int:
    """Tile rows for a step whose shortest non-empty segment has `shortest` rows (0: none)."""
    return min(_MAX_BLOCK_M, max(BLOCK_M, _next_pow2(shortest)))


def padded_rank(r_max: int) -> int:
    """The rank tile both kernels use: the next power of two >= max(r_max, 16)."""
    return max(16, _next_pow2(r_max))


@dataclass(slots=True)
class LoRAModuleMeta:
    """One module's view of a step's LoRA metadata: what `lora_grouped_triton` reads.

    seg: int32 [3, n] device tensor (start, length, slot); rank: int32 [n]; scale: float32 [n];
    tiles: int32 [1 + 2 x tile_capacity]: the step's tile count, then (segment index, first row within
    the segment) per tile of block_m rows. num_segments: n (the capacity when fixed); max_len: the longest
    segment (a bound, when fixed); tile_capacity: the room in `tiles`, which bounds the grid.
    """

    seg: torch.Tensor
    rank: torch.Tensor
    scale: torch.Tensor
    tiles: torch.Tensor
    num_segments: int
    max_len: int
    tile_capacity: int
    block_m: int


class LoRAMeta:
    """Per-step LoRA metadata for the Triton op, built once per step and shared by every layer.

    The caller (the engine, where it makes the step's `LoRABatch`) builds it from the segments and
    the slot store's host-side lists (`store.ranks`, `store.scales`: module -> list over slots); only
    the active slots' entries are read, so the cost is O(segments x modules + tiles), not O(slots).
    One int32 device buffer holds it all: [ints (3 + M) x n | floats M x n (bit-cast) | tile count |
    tile map 2 x tile_capacity], the variable part last so that `update` copies only a prefix.
    """

    def __init__(self, packed: torch.Tensor, staging: torch.Tensor | None, modules: tuple[str, ...],
                 num_segments: int, max_len: int, tile_capacity: int, block_m: int, capacity: int | None,
                 max_len_bound: int | None):
        n, m = num_segments, len(modules)
        self.packed = packed
        self.ints = packed[: (3 + m) * n].view(3 + m, n)  # start, length, slot, then one rank row per module
        self.floats = packed[(3 + m) * n : (3 + 2 * m) * n].view(torch.float32).view(m, n)  # scale rows
        self.tiles = packed[(3 + 2 * m) * n :]  # tile count, then (segment, row) pairs
        self.modules = modules
        self.num_segments = num_segments
        self.max_len = max_len
        self.tile_capacity = tile_capacity
        self.block_m = block_m
        self.capacity = capacity
        self.max_len_bound = max_len_bound
        # update()'s host staging: pinned once (a pin_memory() per step costs a cudaHostAlloc)
        self._staging = staging
        self._views = {mod: LoRAModuleMeta(self.ints[:3], self.ints[3 + i], self.floats[i], self.tiles, n, max_len,
                                           tile_capacity, block_m)
                       for i, mod in enumerate(modules)}  # views: update() rewrites what they see

    @staticmethod
    def _words(num_modules: int, n: int, tile_capacity: int) -> int:
        return (3 + 2 * num_modules) * n + 1 + 2 * tile_capacity

    @staticmethod
    def _segment_array(segments: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """The segments as int64 [k, 3]: start, length, slot."""
        seg = np.array(segments, dtype=np.int64).reshape(len(segments), 3)
        seg[:, 1] -= seg[:, 0]
        return seg

    @staticmethod
    def _tile_counts(seg: np.ndarray, block_m: int) -> np.ndarray:
        return (np.maximum(seg[:, 1], 0) + block_m - 1) // block_m

    @staticmethod
    def _fill(buf: np.ndarray, seg: np.ndarray, block_m: int, ranks_by_module: Mapping[str, Sequence[int]],
              scales_by_module: Mapping[str, Sequence[float]], modules: tuple[str, ...], n: int) -> int:
        """Write a step into the flat int32 `buf` (the layout above); returns the words written."""
        k, m = len(seg), len(modules)
        ints = buf[: (3 + m) * n].reshape(3 + m, n)
        floats = buf[(3 + m) * n : (3 + 2 * m) * n].view(np.float32).reshape(m, n)
        ints[:3, :k] = seg.T
        ints[:, k:] = 0  # padding segments: length 0, no tiles
        floats[:, k:] = 0.0
        slots = seg[:, 2].tolist()
        for i, mod in enumerate(modules):  # only the active slots' entries: O(k), never O(slots)
            ranks, scales = ranks_by_module[mod], scales_by_module[mod]
            ints[3 + i, :k] = np.array([ranks[s] for s in slots], dtype=np.int32)
            floats[i, :k] = np.array([scales[s] for s in slots], dtype=np.float32)
        at = (3 + 2 * m) * n
        tile_counts = LoRAMeta._tile_counts(seg, block_m)
        num_tiles = int(tile_counts.sum())
        buf[at] = num_tiles
        pairs = buf[at + 1 : at + 1 + 2 * num_tiles].reshape(num_tiles, 2)
        if num_tiles == k and (tile_counts == 1).all():  # decode: one tile per segment
            pairs[:, 0] = np.arange(k)
            pairs[:, 1] = 0
        else:
            pairs[:, 0] = np.repeat(np.arange(k), tile_counts)
            first = np.repeat(np.cumsum(tile_counts) - tile_counts, tile_counts)  # each tile's segment's first tile
            pairs[:, 1] = (np.arange(num_tiles) - first) * block_m
        return at + 1 + 2 * num_tiles

    @classmethod
    def build(cls, segments: Sequence[tuple[int, int, int]], ranks_by_module: Mapping[str, Sequence[int]],
              scales_by_module: Mapping[str, Sequence[float]], device: torch.device | str,
              capacity: int | None = None, max_len_bound: int | None = None) -> LoRAMeta:
        """Pack a step's segments, per-module ranks/scales and tile map into one device buffer (one copy).

        capacity: fixed number of segment entries (e.g. max_num_seqs); with max_len_bound (e.g. the
        step's token budget) the buffer and the launch grid no longer depend on the batch: what CUDA
        graphs need. Its tiles have BLOCK_M rows; without capacity, as many as the shortest segment fills
        (up to 64: a prefill-only step re-reads its adapters' weights less).
        """
        modules = tuple(ranks_by_module)
        n = len(segments) if capacity is None else capacity
        if len(segments) > n:
            raise ValueError(f"{len(segments)} segments exceed the metadata capacity {n}")
        seg = cls._segment_array(segments)
        longest = int(seg[:, 1].max(initial=0))
        if max_len_bound is not None and longest > max_len_bound:
            raise ValueError(f"a segment of {longest} tokens exceeds max_len_bound {max_len_bound}")
        max_len = longest if max_len_bound is None else max_len_bound
        nonempty = seg[:, 1][seg[:, 1] > 0]
        block_m = BLOCK_M if capacity is not None or not len(nonempty) else _block_m(int(nonempty.min()))
        tile_capacity = int(cls._tile_counts(seg, block_m).sum())
        if capacity is not None:  # room for any update(): capacity segments of max_len tokens
            tile_capacity = max(tile_capacity, capacity * _cdiv(max_len, block_m))
        on = torch.device(device)
        pin = on.type == "cuda"
        host = torch.zeros(cls._words(len(modules), n, tile_capacity), dtype=torch.int32, pin_memory=pin)
        cls._fill(host.numpy(), seg, block_m, ranks_by_module, scales_by_module, modules, n)
        if capacity is None:
            return cls(host.to(on, non_blocking=True) if pin else host, None, modules, n, max_len, tile_capacity,
                       block_m, capacity, max_len_bound)
        # fixed capacity: `host` stays as update()'s staging, so this one copy completes before it returns
        packed = host.to(on) if pin else host.clone()
        return cls(packed, host, modules, n, max_len, tile_capacity, block_m, capacity, max_len_bound)

    def update(self, segments: Sequence[tuple[int, int, int]], ranks_by_module: Mapping[str, Sequence[int]],
               scales_by_module: Mapping[str, Sequence[float]]) -> None:
        """Rewrite a fixed-capacity meta in place (the tensors a captured graph reads stay the same)."""
        if self.capacity is None or self.max_len_bound is None:
            raise ValueError("update() needs a meta built with capacity= and max_len_bound=")
        if len(segments) > self.capacity:
            raise ValueError(f"{len(segments)} segments exceed the metadata capacity {self.capacity}")
        seg = self._segment_array(segments)
        if len(seg) and seg[:, 1].max() > self.max_len_bound:
            raise ValueError(f"a segment exceeds max_len_bound {self.max_len_bound}")
        assert self._staging is not None
        # the copy out of the staging buffer that the last update queued must have run before it is
        # rewritten: the engine's runner waits for that (an event per captured graph, recorded after
        # the step's copies), also with pipelined steps, where no sampling sync sits in between
        used = self._fill(self._staging.numpy(), seg, self.block_m, ranks_by_module, scales_by_module, self.modules,
                          self.capacity)
        self.packed[:used].copy_(self._staging[:used], non_blocking=True)

    def __getitem__(self, module: str) -> LoRAModuleMeta:
        return self._views[module]


def grid_tiles(meta: LoRAModuleMeta, tokens: int) -> int:
    """The token-tile axis of both kernels' grids for x of `tokens` rows: the most tiles a step can have.

    Segments are disjoint row ranges of x, so at most n = min(segments, tokens) of them are non-empty
    and they make at most n + (tokens - n) // block_m tiles (one partial tile each at most).
    """
    n = min(meta.num_segments, tokens)
    return min(meta.tile_capacity, n + (tokens - n) // meta.block_m)


def lora_grouped_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: Sequence[int] | None,
    scales: Sequence[float] | None,
    segments: Sequence[tuple[int, int, int]] | None,
    meta: LoRAModuleMeta | None = None,
    *,
    split_k: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """`lora_grouped` (kernels/lora.py) as two Triton kernels; y is updated in place and returned.

    With `meta` (from `LoRAMeta.build(...)[module]`, built once per step) ranks, scales and segments
    are not read (pass None) and the call does no host work beyond the launch. Without it, the
    metadata is built from the host lists on every call (fine for tests, wasteful per layer).
    split_k / block_n override the heuristics (benchmarks and tuning).
    """
    if not HAS_TRITON:
        raise RuntimeError("lora_grouped_triton needs triton (pip install -e '.[gpu]')")
    _check_shapes(x, y, a, b)
    if meta is None:
        if segments is None or ranks is None or scales is None:
            raise ValueError("pass either meta or ranks, scales and segments")
        if not segments:
            return y
        meta = LoRAMeta.build(segments, {"m": ranks}, {"m": scales}, x.device)["m"]
    lora_multi_triton(x, [(y, a, b, meta)], split_k=split_k, block_n=block_n)
    return y


def _check_shapes(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    check_shapes(x, y, a, b)
    if len({x.dtype, y.dtype, a.dtype, b.dtype}) != 1 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x, y, A, B must share one dtype of float32/bfloat16/float16, got "
                         f"{x.dtype}, {y.dtype}, {a.dtype}, {b.dtype}")
    if a.shape[1] > 128:
        raise ValueError(f"r_max {a.shape[1]} > 128 is not supported by the Triton LoRA kernels")


# --- several modules that read the same input (q/k/v, gate/up) in two launches -----------------------

MAX_GROUP = 3
_MULTI_BLOCK_K = 256
_MULTI_MAX_SPLIT = 4


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Both kernels' grids and tiles for one `lora_multi_triton` call (a function of shapes alone)."""

    tiles: int  # the token-tile axis (grid_tiles)
    modules: int
    split: int  # K splits of the shrink
    k_per_split: int
    block_n: int
    out_tiles: tuple[int, ...]  # output tiles per module

    @property
    def shrink_grid(self) -> tuple[int, int]:
        return (self.modules * self.split, self.tiles)

    @property
    def expand_grid(self) -> tuple[int, int]:
        return (sum(self.out_tiles), self.tiles)

    @property
    def programs(self) -> tuple[int, int]:
        """(shrink, expand) programs launched, idle ones included."""
        return self.shrink_grid[0] * self.tiles, self.expand_grid[0] * self.tiles


def launch_plan(tokens: int, fan_in: int, fan_outs: Sequence[int], meta: LoRAModuleMeta, *,
                split_k: int | None = None, block_n: int | None = None) -> LaunchPlan:
    """The grids `lora_multi_triton` launches for x [tokens, fan_in] and the modules' outputs."""
    tiles = grid_tiles(meta, tokens)
    if tiles > _MAX_GRID_Y:
        raise ValueError(f"{tiles} token tiles exceed the grid's limit {_MAX_GRID_Y}")
    m = len(fan_outs)
    widest = max(fan_outs)
    if block_n is None:
        block_n = 128 if widest >= 2048 else 64
    block_n = min(block_n, max(16, _next_pow2(widest)))
    k_blocks = _cdiv(fan_in, _MULTI_BLOCK_K)
    if split_k is None:
        want = _cdiv(2 * _NUM_SMS, max(1, tiles * m))  # ~2 programs per SM
        split_k = min(_MULTI_MAX_SPLIT, _next_pow2(want))
    split = max(1, min(split_k, k_blocks))
    k_per_split = _cdiv(k_blocks, split) * _MULTI_BLOCK_K
    split = _cdiv(fan_in, k_per_split)
    return LaunchPlan(tiles, m, split, k_per_split, block_n, tuple(_cdiv(n, block_n) for n in fan_outs))


def lora_multi_triton(
    x: torch.Tensor,
    targets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, LoRAModuleMeta]],
    *,
    split_k: int | None = None,
    block_n: int | None = None,
) -> None:
    """`lora_grouped` for up to three modules that share the input x (q/k/v, or gate/up), in two
    launches for all of them: targets are (y, A, B, meta[module]) with A [S, R, in] of one shape,
    metas of one step (the same segments and tiles; ranks and scales per module). Each y is updated
    in place.

    1. shrink, grid (module x K split, token tile): the split's partial of
       u[m, t, :R] = scale_m * x[t] @ A_m[slot, :R]^T into its own float32 plane [M, SPLIT, T, R] (no
       atomics: deterministic). K tiles of 256: one program without splits, reading a whole 8B-shape
       rank-16 A (128 KB) in 64-wide tiles, took 23 us (latency-bound: benchmarks/RESULTS.md).
    2. expand, grid (output tile over the modules' outputs one after another, token tile):
       y_m[t, n] += sum of u's SPLIT planes (rounded to the weights' dtype) @ B_m[slot, n, :R]^T.
    Same masks and roundings as `lora_grouped_triton` (stale rank rows read as zero).
    """
    if not 1 <= len(targets) <= MAX_GROUP:
        raise ValueError(f"lora_multi_triton takes 1..{MAX_GROUP} modules, got {len(targets)}")
    for y, a, b, _ in targets:
        _check_shapes(x, y, a, b)
    lora_multi_expand(lora_multi_shrink(x, [(a, meta) for _, a, _, meta in targets], [y.shape[1] for y, _, _, _ in targets],
                                        split_k=split_k, block_n=block_n), targets)


@dataclass(slots=True)
class Shrunk:
    """`lora_multi_shrink`'s result: the split-K planes of u, and what the expand needs to read them."""

    u: torch.Tensor | None  # float32 [M, SPLIT, T, R]; None when the step has no tile
    x: torch.Tensor
    plan: LaunchPlan
    r_pad: int
    ieee: bool


def lora_multi_shrink(x: torch.Tensor, modules: Sequence[tuple[torch.Tensor, LoRAModuleMeta]], fan_outs: Sequence[int],
                      *, split_k: int | None = None, block_n: int | None = None,
                      stream: torch.cuda.Stream | None = None) -> Shrunk:
    """The first half of `lora_multi_triton`: modules are (A, meta[module]), fan_outs their outputs' widths.
    With `stream`, u is allocated on the current stream and the shrink is launched on `stream` (which
    must already wait for x): the caller runs the base GEMM meanwhile and joins before the expand."""
    if not HAS_TRITON:
        raise RuntimeError("lora_multi_triton needs triton (pip install -e '.[gpu]')")
    if not 1 <= len(modules) <= MAX_GROUP or len(fan_outs) != len(modules):
        raise ValueError(f"lora_multi_triton takes 1..{MAX_GROUP} modules, got {len(modules)}")
    a0 = modules[0][0]
    if any(a.shape != a0.shape or a.stride() != a0.stride() for a, _ in modules):
        raise ValueError("the grouped modules' A tensors must share one shape and layout [S, R, in]")
    if x.dim() != 2 or x.shape[1] != a0.shape[2] or x.dtype != a0.dtype or a0.shape[1] > 128:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not match A {tuple(a0.shape)} {a0.dtype} "
                         "(or r_max > 128, which the Triton LoRA kernels do not support)")
    meta = modules[0][1]
    tokens, fan_in = x.shape
    plan = launch_plan(tokens, fan_in, fan_outs, meta, split_k=split_k, block_n=block_n)
    r_pad = padded_rank(a0.shape[1])
    ieee = x.dtype == torch.float32 or (_INTERPRETED and x.dtype == torch.bfloat16)
    if plan.tiles == 0:
        return Shrunk(None, x, plan, r_pad, ieee)
    u = torch.empty((plan.modules, plan.split, tokens, r_pad), dtype=torch.float32, device=x.device)
    padded = [*modules, *[modules[0]] * (MAX_GROUP - plan.modules)]  # unused pointer slots: never read
    (a0_, m0), (a1, m1), (a2, m2) = padded
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        _shrink_multi_kernel[plan.shrink_grid](
            x, a0_, a1, a2, u, meta.seg, meta.tiles, m0.rank, m1.rank, m2.rank, m0.scale, m1.scale, m2.scale,
            meta.seg.stride(0), fan_in, x.stride(0), x.stride(1), a0.stride(0), a0.stride(1), a0.stride(2), u.stride(0),
            u.stride(1), u.stride(2), K_PER_SPLIT=plan.k_per_split, SPLIT=plan.split, BLOCK_M=meta.block_m,
            BLOCK_K=_MULTI_BLOCK_K, R=r_pad, IEEE=ieee,
        )
    return Shrunk(u, x, plan, r_pad, ieee)


def lora_multi_expand(shrunk: Shrunk, targets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, LoRAModuleMeta]]
                      ) -> None:
    """The second half of `lora_multi_triton`: targets (y, A, B, meta[module]) in the shrink's order."""
    for y, a, b, _ in targets:
        _check_shapes(shrunk.x, y, a, b)
    plan, u = shrunk.plan, shrunk.u
    if u is None:
        return
    m = plan.modules
    meta = targets[0][3]
    padded = [*targets, *[targets[0]] * (MAX_GROUP - m)]
    t1 = plan.out_tiles[0]
    t2 = t1 + (plan.out_tiles[1] if m > 1 else 0)
    (y0, _, b0, m0), (y1, _, b1, m1), (y2, _, b2, m2) = padded
    _expand_multi_kernel[plan.expand_grid](
        u, b0, b1, b2, y0, y1, y2, meta.seg, meta.tiles, m0.rank, m1.rank, m2.rank, meta.seg.stride(0),
        y0.shape[1], y1.shape[1], y2.shape[1], t1, t2,
        u.stride(0), u.stride(1), u.stride(2), b0.stride(0), b0.stride(1), b0.stride(2), b1.stride(0), b1.stride(1),
        b1.stride(2), b2.stride(0), b2.stride(1), b2.stride(2), y0.stride(0), y1.stride(0), y2.stride(0),
        SPLIT=plan.split, BLOCK_M=meta.block_m, BLOCK_N=plan.block_n, R=shrunk.r_pad, IEEE=shrunk.ieee,
    )


if HAS_TRITON:

    @triton.jit
    def _shrink_multi_kernel(
        x_ptr, a0_ptr, a1_ptr, a2_ptr, u_ptr, seg_ptr, tile_ptr, r0_ptr, r1_ptr, r2_ptr, s0_ptr, s1_ptr, s2_ptr,
        seg_stride, fan_in, sx_t, sx_k, sa_s, sa_r, sa_k, su_m, su_s, su_t,
        K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        R: tl.constexpr, IEEE: tl.constexpr,
    ):
        mod = tl.program_id(0) // SPLIT
        pid_k = tl.program_id(0) % SPLIT
        pid_t = tl.program_id(1)
        if mod == 0:
            a_ptr, rank_ptr, scale_ptr = a0_ptr, r0_ptr, s0_ptr
        elif mod == 1:
            a_ptr, rank_ptr, scale_ptr = a1_ptr, r1_ptr, s1_ptr
        else:
            a_ptr, rank_ptr, scale_ptr = a2_ptr, r2_ptr, s2_ptr
        # the count and this tile's entry in parallel (the grid never exceeds the map's room)
        num_tiles = tl.load(tile_ptr)
        seg = tl.load(tile_ptr + 1 + 2 * pid_t)
        first = tl.load(tile_ptr + 2 + 2 * pid_t)
        if pid_t < num_tiles:
            rank = tl.load(rank_ptr + seg)
            length = tl.load(seg_ptr + seg_stride + seg)
            start = tl.load(seg_ptr + seg)
            slot = tl.load(seg_ptr + 2 * seg_stride + seg).to(tl.int64)
            scale = tl.load(scale_ptr + seg)
            if rank > 0:
                offs_m = first + tl.arange(0, BLOCK_M)
                row_ok = offs_m < length
                rows = (start + offs_m).to(tl.int64)
                offs_r = tl.arange(0, R)
                r_ok = offs_r < rank
                offs_k = tl.arange(0, BLOCK_K)
                x_base = x_ptr + rows[:, None] * sx_t
                a_base = a_ptr + slot * sa_s + offs_r[None, :] * sa_r
                acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
                for kk in range(0, K_PER_SPLIT, BLOCK_K):
                    k = pid_k * K_PER_SPLIT + kk + offs_k
                    k_ok = k < fan_in
                    xt = tl.load(x_base + k[None, :] * sx_k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    at = tl.load(a_base + k[:, None] * sa_k, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                    if IEEE:
                        acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(xt, at)
                u_ptrs = u_ptr + mod * su_m + pid_k * su_s + rows[:, None] * su_t + offs_r[None, :]
                tl.store(u_ptrs, acc * scale, mask=row_ok[:, None])

    @triton.jit
    def _expand_multi_kernel(
        u_ptr, b0_ptr, b1_ptr, b2_ptr, y0_ptr, y1_ptr, y2_ptr, seg_ptr, tile_ptr, r0_ptr, r1_ptr, r2_ptr, seg_stride,
        n0, n1, n2, t1, t2, su_m, su_s, su_t,
        sb0_s, sb0_n, sb0_r, sb1_s, sb1_n, sb1_r, sb2_s, sb2_n, sb2_r, sy0, sy1, sy2,
        SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_t = tl.program_id(1)
        if pid_n < t1:
            mod, tile, fan_out, b_ptr, y_ptr, rank_ptr = 0, pid_n, n0, b0_ptr, y0_ptr, r0_ptr
            sb_s, sb_n, sb_r, sy = sb0_s, sb0_n, sb0_r, sy0
        elif pid_n < t2:
            mod, tile, fan_out, b_ptr, y_ptr, rank_ptr = 1, pid_n - t1, n1, b1_ptr, y1_ptr, r1_ptr
            sb_s, sb_n, sb_r, sy = sb1_s, sb1_n, sb1_r, sy1
        else:
            mod, tile, fan_out, b_ptr, y_ptr, rank_ptr = 2, pid_n - t2, n2, b2_ptr, y2_ptr, r2_ptr
            sb_s, sb_n, sb_r, sy = sb2_s, sb2_n, sb2_r, sy2
        num_tiles = tl.load(tile_ptr)
        seg = tl.load(tile_ptr + 1 + 2 * pid_t)
        first = tl.load(tile_ptr + 2 + 2 * pid_t)
        if pid_t < num_tiles:
            rank = tl.load(rank_ptr + seg)
            length = tl.load(seg_ptr + seg_stride + seg)
            start = tl.load(seg_ptr + seg)
            slot = tl.load(seg_ptr + 2 * seg_stride + seg).to(tl.int64)
            if rank > 0:
                offs_m = first + tl.arange(0, BLOCK_M)
                row_ok = offs_m < length
                rows = (start + offs_m).to(tl.int64)
                offs_r = tl.arange(0, R)
                r_ok = offs_r < rank
                u_ptrs = u_ptr + mod * su_m + rows[:, None] * su_t + offs_r[None, :]
                u = tl.zeros((BLOCK_M, R), dtype=tl.float32)
                for s in tl.static_range(SPLIT):  # the deterministic split-K reduction
                    u += tl.load(u_ptrs + s * su_s, mask=row_ok[:, None], other=0.0)
                u = u.to(b_ptr.dtype.element_ty)
                offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < fan_out
                bt = tl.load(b_ptr + slot * sb_s + offs_n[None, :] * sb_n + offs_r[:, None] * sb_r,
                             mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                if IEEE:
                    delta = tl.dot(u.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
                else:
                    delta = tl.dot(u, bt)
                y_ptrs = y_ptr + rows[:, None] * sy + offs_n[None, :]
                mask = row_ok[:, None] & n_ok[None, :]
                yt = tl.load(y_ptrs, mask=mask, other=0.0)
                tl.store(y_ptrs, (yt.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)
