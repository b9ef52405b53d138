"""The decoder's layers: RMSNorm, rotary embedding (incl. llama3 scaling), LoRA-capable linear,
attention over the paged KV cache, SwiGLU MLP. Parameter names are Hugging Face's."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorascope.kernels import fused_triton
from lorascope.kernels.attention import paged_attention
from lorascope.kernels.lora import lora_grouped
from lorascope.model.config import ModelConfig
from lorascope.model.context import StepContext
from lorascope.model.lora import LoRASlotStore

if TYPE_CHECKING:
    from lorascope.kernels.lora_triton import LoRAMeta


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in float32; the result comes out in the weights' dtype (HF's order of casts)."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], float32, with llama3 scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.materialize(torch.device("cpu"))

    def materialize(self, device: torch.device) -> None:
        """(Re)compute the tables on `device`: they are derived, never loaded."""
        with torch.device(device):
            freqs = torch.arange(self.max_len, dtype=torch.float32)[:, None] * rope_inv_freq(self.cfg)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
            self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # x [T, heads, D]
        cos = self.cos[positions].to(x.dtype)[:, None, :]
        sin = self.sin[positions].to(x.dtype)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class LoRALinear(nn.Module):
    """A linear layer that adds the batch's LoRA deltas, grouped by slot (see kernels/lora.py)."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool, layer: int, module: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.bias = nn.Parameter(torch.empty(fan_out)) if bias else None
        self.key = (layer, module)
        self.store: LoRASlotStore | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.side_stream is not None and ctx.lora is not None and ctx.lora.kernel_meta is not None:
            return project(x, (self,), ctx)[0]
        y = linear(x, self.weight, self.bias)
        store = self.store
        if store is not None and ctx.lora is not None and self.key in store.a:
            if ctx.lora.kernel_meta is not None:
                from lorascope.kernels.lora_triton import lora_grouped_triton

                lora_grouped_triton(x, y, store.a[self.key], store.b[self.key], None, None, None,
                                    meta=ctx.lora.kernel_meta[self.key[1]])
            else:
                self.add_lora(x, y, ctx)
        return y

    def add_lora(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> None:
        """y += this module's LoRA deltas with torch's grouped op, in place (y may be a column slice)."""
        store = self.store
        if store is not None and ctx.lora is not None and self.key in store.a:
            module = self.key[1]
            lora_grouped(x, y, store.a[self.key], store.b[self.key], store.ranks[module], store.scales[module],
                         ctx.lora.segments)


@dataclass(slots=True)
class PackedProjection:
    """The weights of linears that read the same x (q/k/v, gate/up) stacked in one contiguous
    [sum(out), in] tensor, so one GEMM computes them all. Each linear's `weight` (and `bias`) is a
    row-slice view of it: no second copy, and the HF parameter names and state_dict stay as they were.

    `bounds` are the output column offsets (0, out_0, out_0 + out_1, ...); `ptrs` the data pointers the
    views had when packed, by which `backs` tells whether they still are views (a `.to()`, a reload or a
    `param.data = ...` replaces them with tensors of their own)."""

    weight: torch.Tensor  # [sum(out), in]
    bias: torch.Tensor | None  # [sum(out)]
    bounds: tuple[int, ...]
    ptrs: tuple[int, ...]

    def backs(self, lins: tuple[LoRALinear, ...]) -> bool:
        return _ptrs(lins) == self.ptrs


def _ptrs(lins: tuple[LoRALinear, ...]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for lin in lins for t in (lin.weight, lin.bias) if t is not None)


@torch.no_grad()
def pack_linears(lins: tuple[LoRALinear, ...], current: PackedProjection | None = None) -> PackedProjection:
    """Stack `lins`' weights (and biases) into one tensor and make theirs views of it; `current`, when
    it still backs them, is returned as it is (packing twice changes nothing)."""
    if current is not None and current.backs(lins):
        return current
    w0 = lins[0].weight
    if any(lin.weight.shape[1] != w0.shape[1] or lin.weight.dtype != w0.dtype or lin.weight.device != w0.device
           or (lin.bias is None) != (lins[0].bias is None) for lin in lins):
        raise ValueError("packed linears must share fan_in, dtype, device and whether they have a bias")
    bounds = (0, *itertools.accumulate(lin.weight.shape[0] for lin in lins))
    weight = torch.cat([lin.weight for lin in lins])  # [sum(out), in]
    bias = torch.cat([lin.bias for lin in lins]) if lins[0].bias is not None else None
    for lin, a, b in zip(lins, bounds, bounds[1:]):
        lin.weight.data = weight[a:b]  # the old storage is freed here (nothing else holds it)
        if bias is not None:
            lin.bias.data = bias[a:b]
    return PackedProjection(weight, bias, bounds, _ptrs(lins))


@torch.no_grad()
def unpack_linears(lins: tuple[LoRALinear, ...]) -> None:
    """Give each linear a weight (and bias) of its own again (A/B benchmarks of packing)."""
    for lin in lins:
        lin.weight.data = lin.weight.clone()
        if lin.bias is not None:
            lin.bias.data = lin.bias.clone()


def project(x: torch.Tensor, lins: tuple[LoRALinear, ...], ctx: StepContext,
            packed: PackedProjection | None = None, with_lora: bool = True) -> list[torch.Tensor]:
    """Several LoRA-capable linears that read the same x (q/k/v, gate/up).

    With `packed` (Decoder.pack_projections) the base products are one GEMM over the stacked weight and
    the outputs are column slices of its [T, sum(out)] result: row stride sum(out), columns contiguous,
    which every consumer takes (views, the fused kernels, lora_multi_triton pass row strides). With the
    Triton LoRA op (CUDA), the LoRA deltas go through one shrink and one expand launch for all of them
    (kernels/lora_triton.py `lora_multi_triton`); otherwise each linear adds its own, in place. With
    `ctx.side_stream` the shrink runs beside the base GEMM (`_overlapped`). with_lora=False: the base
    products only (the fused kernels around the GEMM add the deltas: `fused_lora`)."""
    if not with_lora:
        return _base(x, lins, packed)
    meta = ctx.lora.kernel_meta if ctx.lora is not None else None
    if (meta is not None and ctx.side_stream is not None and x.shape[0] <= OVERLAP_MAX_TOKENS
            and (ys := _overlapped(x, lins, packed, meta, ctx.side_stream))):
        return ys
    ys = _base(x, lins, packed)
    if meta is None:
        for lin, y in zip(lins, ys):
            lin.add_lora(x, y, ctx)
        return ys
    from lorascope.kernels.lora_triton import lora_multi_triton

    targets = [(y, lin.store.a[lin.key], lin.store.b[lin.key], meta[lin.key[1]])
               for lin, y in zip(lins, ys) if lin.store is not None and lin.key in lin.store.a]
    if targets:
        lora_multi_triton(x, targets)
    return ys


# Steps of at most this many tokens run the LoRA shrink beside the base GEMM (`_overlapped`). Measured on an
# H200, 8B shape, rank-16 q/v adapters (benchmarks/gpu_step_ab.py): a captured step of 1-4 tokens takes
# 4.44-4.57 ms overlapped against 4.60-4.79 serial, 8 tokens 4.84 against 4.95; from 16 tokens the GEMM
# fills the SMs and the overlap gains nothing (32 tokens: 5.00 against 4.96 ms).
OVERLAP_MAX_TOKENS = 8


# Steps of at most this many tokens fold the LoRA of q/k/v and of gate/up into the fused kernels around
# their GEMM (`fused_lora`): the shrink into the norm before it, the expand into the rotary / SiLU kernel
# after it, which removes the two grouped launches per group. Each token re-reads its adapter's A rows
# (from L2 after the first token of a segment), so long prefill chunks keep the grouped kernels, whose
# 16-row tiles share them. A dict so benchmarks can A/B it ("max_tokens": 0 turns it off). By default steps
# of 9..64 tokens fuse: measured on an H100 (benchmarks/RESULTS.md, 2026-12-07 session 12), the captured
# 8B step with 32 adapters, fused against grouped: buckets 16 / 24 / 32 / 64 took 6.03 / 6.06 / 6.15 / 6.43
# against 6.19 / 6.25 / 6.32 / 6.46 ms, but 128 took 7.21 against 6.90 and 1..8 up to 0.04 ms more (the
# grouped shrink runs beside the GEMM there, OVERLAP_MAX_TOKENS). `LORASCOPE_FUSED_LORA_MAX_TOKENS` sets
# the upper bound (0: off); "min_tokens" the lower one.
def _max_tokens_env(name: str, default: int = 0) -> int:
    env = os.environ.get(name)
    if env is None or env == "":
        return default
    if not env.isdigit():
        raise ValueError(f"{name} must be a token count (0 turns it off), got {env!r}")
    return int(env)


LORA_FUSION: dict[str, int] = {"max_tokens": _max_tokens_env("LORASCOPE_FUSED_LORA_MAX_TOKENS", 64),
                               "min_tokens": OVERLAP_MAX_TOKENS + 1}

# Steps of at most this many tokens run their weight GEMMs through the split-K Triton kernel
# (kernels/gemm_triton.py) instead of cuBLAS, on CUDA. Off (0) by default: on an H100 its best configs were
# slower than cuBLASLt for every layer GEMM at 32 and 64 tokens, and the captured step 0.43 ms slower
# (benchmarks/RESULTS.md, 2026-12-07 session 12); `LORASCOPE_SKINNY_GEMM_MAX_TOKENS` sets it for a process.
SKINNY_GEMM: dict[str, int] = {"max_tokens": _max_tokens_env("LORASCOPE_SKINNY_GEMM_MAX_TOKENS")}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or the skinny split-K kernel for CUDA steps of at most SKINNY_GEMM's tokens."""
    if (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= SKINNY_GEMM["max_tokens"] and x.stride(1) == 1
            and weight.stride(1) == 1 and fused_triton.HAS_TRITON):
        from lorascope.kernels.gemm_triton import MAX_TOKENS, skinny_linear

        if x.shape[0] <= MAX_TOKENS:
            return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def fused_lora(lins: tuple[LoRALinear, ...], ctx: StepContext, tokens: int) -> fused_triton.FusedLoRA | None:
    """The fused kernels' LoRA operands for the group `lins` (q/k/v or gate/up) in this step, or None when
    the step keeps the grouped kernels: no Triton metadata (CPU), tokens outside LORA_FUSION's range, no
    LoRA weights in the group, or a shape the fused kernels do not take (`fused_triton.fusable`)."""
    meta = ctx.lora.kernel_meta if ctx.lora is not None else None
    if meta is None or not LORA_FUSION["min_tokens"] <= tokens <= LORA_FUSION["max_tokens"]:
        return None
    modules: list[fused_triton.LoRAModule | None] = []
    seg = None
    for lin in lins:
        if lin.store is None or lin.key not in lin.store.a:
            modules.append(None)
            continue
        m = meta[lin.key[1]]
        modules.append(fused_triton.LoRAModule(lin.store.a[lin.key], lin.store.b[lin.key], m.rank, m.scale))
        seg = m.seg
    if seg is None:
        return None
    lora = fused_triton.FusedLoRA(tuple(modules), seg)
    return lora if fused_triton.fusable(lora) is None else None


def _base(x: torch.Tensor, lins: tuple[LoRALinear, ...], packed: PackedProjection | None) -> list[torch.Tensor]:
    if packed is None:
        return [linear(x, lin.weight, lin.bias) for lin in lins]
    if not packed.backs(lins):
        raise RuntimeError("the packed projection no longer backs its linears' weights (replaced after "
                           "Decoder.pack_projections()?); call pack_projections() again")
    y = linear(x, packed.weight, packed.bias)  # [T, sum(out)]
    return [y[:, a:b] for a, b in zip(packed.bounds, packed.bounds[1:])]


def _overlapped(x: torch.Tensor, lins: tuple[LoRALinear, ...], packed: PackedProjection | None,
                meta: LoRAMeta, side: torch.cuda.Stream) -> list[torch.Tensor] | None:
    """`project` with the LoRA shrink on `side` while the base GEMM runs on the current stream: the shrink
    reads only x, and its few hundred short programs find SMs the skinny GEMM leaves idle. The expand
    (it adds into the GEMM's output) runs after the join. None when no linear here has LoRA weights."""
    from lorascope.kernels.lora_triton import lora_multi_expand, lora_multi_shrink

    with_lora = [(i, lin) for i, lin in enumerate(lins) if lin.store is not None and lin.key in lin.store.a]
    if not with_lora:
        return None
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    shrunk = lora_multi_shrink(x, [(lin.store.a[lin.key], meta[lin.key[1]]) for _, lin in with_lora],
                               [lin.weight.shape[0] for _, lin in with_lora], stream=side)
    ys = _base(x, lins, packed)
    main.wait_stream(side)
    lora_multi_expand(shrunk, [(ys[i], lin.store.a[lin.key], lin.store.b[lin.key], meta[lin.key[1]]) for i, lin in with_lora])
    return ys


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = LoRALinear(cfg.hidden_size, cfg.q_size, bias, layer, "q_proj")
        self.k_proj = LoRALinear(cfg.hidden_size, cfg.kv_size, bias, layer, "k_proj")
        self.v_proj = LoRALinear(cfg.hidden_size, cfg.kv_size, bias, layer, "v_proj")
        self.o_proj = LoRALinear(cfg.q_size, cfg.hidden_size, False, layer, "o_proj")
        self.rotary = [rotary]  # a list: shared, not a registered submodule of every layer
        self.packed: PackedProjection | None = None  # q/k/v in one weight (Decoder.pack_projections)

    @property
    def qkv(self) -> tuple[LoRALinear, LoRALinear, LoRALinear]:
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: StepContext, fused: bool = False,
                lora: fused_triton.FusedLoRA | None = None) -> torch.Tensor:
        """lora (fused path only): q/k/v's LoRA, shrunk already (`add_rmsnorm_shrink`); the rotary kernel
        adds the deltas."""
        t = x.shape[0]
        if lora is not None and not fused:
            raise ValueError("a fused LoRA needs the fused kernels (fused=True)")
        # packed: column slices, row stride q + 2 kv
        q, k, v = project(x, self.qkv, ctx, self.packed, with_lora=lora is None)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer]
        rotary = self.rotary[0]
        if fused:  # rotary of q (in place) and k, and the K/V cache writes, in one launch
            fused_triton.rope_and_cache(q, k, v, rotary.cos, rotary.sin, positions, ctx.attn.slot_mapping, k_cache, v_cache,
                                        lora=lora)
            out = paged_attention(q, None, None, k_cache, v_cache, ctx.attn, self.head_dim**-0.5)
        else:
            q, k = rotary(q, positions), rotary(k, positions)
            out = paged_attention(q, k, v, k_cache, v_cache, ctx.attn, self.head_dim**-0.5)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim), ctx)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gate_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size, False, layer, "gate_proj")
        self.up_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size, False, layer, "up_proj")
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.hidden_size, False, layer, "down_proj")
        self.packed: PackedProjection | None = None  # gate/up in one weight (Decoder.pack_projections)

    @property
    def gate_up(self) -> tuple[LoRALinear, LoRALinear]:
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, ctx: StepContext, fused: bool = False,
                lora: fused_triton.FusedLoRA | None = None) -> torch.Tensor:
        """lora (fused path only): gate/up's LoRA, shrunk already; the SiLU kernel adds the deltas."""
        if lora is not None and not fused:
            raise ValueError("a fused LoRA needs the fused kernels (fused=True)")
        # packed: column slices, row stride 2 I
        gate, up = project(x, self.gate_up, ctx, self.packed, with_lora=lora is None)
        return self.down_proj(fused_triton.silu_mul(gate, up, lora) if fused else F.silu(gate) * up, ctx)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x is the residual stream, kept in float32 whatever the weights' dtype (see Decoder)."""
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx).float()
        return x + self.mlp(self.post_attention_layernorm(x), ctx).float()

    def forward_fused(self, x: torch.Tensor, delta: torch.Tensor | None, positions: torch.Tensor, ctx: StepContext
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layer with the GPU's fused kernels (kernels/fused_triton.py). `x` is the float32
        residual stream *before* the previous layer's MLP output `delta` is added (None for the first
        layer): that add is fused into this layer's first norm. Returns (the residual stream after the
        attention, this layer's MLP output), which the next layer (or the final norm) adds: `x` itself,
        updated in place, unless a fused LoRA shrink wrote the stream to a new tensor."""
        tokens = x.shape[0]
        x, h, qkv_lora = self._norm(x, delta, self.input_layernorm, fused_lora(self.self_attn.qkv, ctx, tokens))
        a = self.self_attn(h, positions, ctx, fused=True, lora=qkv_lora)
        x, h, gate_up_lora = self._norm(x, a, self.post_attention_layernorm,
                                        fused_lora(self.mlp.gate_up, ctx, tokens))
        return x, self.mlp(h, ctx, fused=True, lora=gate_up_lora)

    @staticmethod
    def _norm(x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm, lora: fused_triton.FusedLoRA | None
              ) -> tuple[torch.Tensor, torch.Tensor, fused_triton.FusedLoRA | None]:
        """add_rmsnorm (in place), or with the shrink of the group that reads its output when that group's
        LoRA is fused (out of place): (residual stream, normalised rows, the group's LoRA with u)."""
        if lora is None:
            return x, fused_triton.add_rmsnorm(x, delta, norm.weight, norm.eps), None
        return fused_triton.add_rmsnorm_shrink(x, delta, norm.weight, norm.eps, lora)
