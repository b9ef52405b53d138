"""The decoder: embeddings, N layers, final norm, LM head. `forward(input_ids, positions, ctx)` on a
flat batch; `compute_logits` on the hidden states of the tokens that sample."""

from __future__ import annotations

import torch
from torch import nn

from lorascope.model.config import ModelConfig
from lorascope.model.context import StepContext
from lorascope.model.layers import DecoderLayer, RMSNorm, Rotary, pack_linears, unpack_linears
from lorascope.model.lora import LoRASlotStore


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg, max_len)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg, max_len)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # fused GPU kernels (kernels/fused_triton.py) instead of torch's elementwise ops: the runner
        # turns this on for CUDA with triton (same arithmetic, a third of the launches)
        self.fused = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # The residual stream stays in float32: in bf16 its 2L roundings cost more accuracy than the
        # matmuls do (llama-3.1-8b shape, benchmarks/RESULTS.md); for float32 models nothing changes.
        x = self.model.embed_tokens(input_ids).float()
        norm = self.model.norm
        if self.fused:
            from lorascope.kernels.fused_triton import add_rmsnorm

            delta = None  # x (a fresh tensor from the embedding lookup) is updated in place or replaced
            for layer in self.model.layers:
                x, delta = layer.forward_fused(x, delta, positions, ctx)
            return add_rmsnorm(x, delta, norm.weight, norm.eps)
        for layer in self.model.layers:
            x = layer(x, positions, ctx)
        return norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.T

    def attach_lora(self, store: LoRASlotStore | None) -> None:
        """Point every LoRA-capable linear at the slot store (None: run the base model only)."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                lin.store = store

    def pack_projections(self) -> None:
        """Per layer, q/k/v in one [q + 2 kv, hidden] weight and gate/up in one [2 I, hidden] weight (and
        qkv biases likewise), so a step runs 4 weight GEMMs per layer instead of 7: the small k/v GEMMs
        alone reach poor bandwidth. Each linear's weight becomes a view of the packed tensor (no extra
        memory; parameter names and state_dict unchanged). Call it once the weights are in place (a
        later reload or `.to()` replaces the views: call it again), and before CUDA graphs are captured
        (a graph keeps reading the weights it was captured with); packing twice changes nothing."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.packed = pack_linears(attn.qkv, attn.packed)
            mlp.packed = pack_linears(mlp.gate_up, mlp.packed)

    def unpack_projections(self) -> None:
        """Undo `pack_projections`: one weight per linear again (A/B benchmarks)."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for group, lins in ((attn, attn.qkv), (mlp, mlp.gate_up)):
                if group.packed is not None:
                    unpack_linears(lins)
                    group.packed = None
