"""L2 prefetch of the next weight GEMM's weights while a latency-bound kernel runs (an experiment, off
by default).

A decode step at batch 32 streams ~15 GB of weights but spends about a quarter of its time in kernels
that leave HBM mostly idle: attention (~21 us a layer), the LoRA launches, the fused norms. A side
stream can pull the next GEMM's weights into L2 (50 MB on an H200) during that time, so the GEMM then
reads them from L2 instead of HBM. The fork points are in `DecoderLayer.forward_fused`:

- `o`: o_proj's weight, forked after the q/k/v projection (overlaps RoPE, the KV write and attention);
- `gate_up`: the first bytes of the packed gate/up weight, forked after o_proj (overlaps its LoRA and
  the second norm);
- `down`: the first bytes of down_proj's weight, forked after the gate/up projection (its LoRA, silu);
- `qkv`: the first bytes of the next layer's packed q/k/v weight, forked after down_proj.

`LORASCOPE_L2_PREFETCH="o=34,gate_up=16;mode=prefetch;programs=32"` turns it on (MB per target; the
runner reads it on CUDA with the fused kernels). Modes: `prefetch` (PTX `prefetch.global.L2::evict_last`,
one instruction per 128-byte line, no registers), `prefetch_normal` (the same without the eviction
hint), `load` (loads with evict_last, summed into a value stored only if it is NaN, so the loads stay).
Nothing the model computes changes: the prefetched bytes are only read, by the GEMM that follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorascope.kernels._triton import HAS_TRITON, tl, triton

TARGETS = ("o", "gate_up", "down", "qkv")
MODES = ("prefetch", "prefetch_normal", "load")
_LINE = 128  # bytes


@dataclass(slots=True)
class PrefetchSpec:
    mb: dict[str, float] = field(default_factory=dict)  # target -> MB prefetched (its whole weight at most)
    mode: str = "prefetch"
    programs: int = 32


def parse_spec(text: str) -> PrefetchSpec:
    """`o=34,gate_up=16;mode=prefetch;programs=32` -> PrefetchSpec (clear errors for anything else)."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise ValueError("LORASCOPE_L2_PREFETCH is empty; give e.g. 'o=34,gate_up=16' (MB per target)")
    spec = PrefetchSpec()
    for item in parts[0].split(","):
        name, _, mb = item.partition("=")
        name = name.strip()
        if name not in TARGETS:
            raise ValueError(f"LORASCOPE_L2_PREFETCH: unknown target {name!r}; targets are {', '.join(TARGETS)}")
        try:
            spec.mb[name] = float(mb)
        except ValueError:
            raise ValueError(f"LORASCOPE_L2_PREFETCH: {item!r} needs MB as a number, e.g. {name}=16") from None
    for opt in parts[1:]:
        key, _, value = opt.partition("=")
        if key == "mode" and value in MODES:
            spec.mode = value
        elif key == "programs" and value.isdigit() and int(value) > 0:
            spec.programs = int(value)
        else:
            raise ValueError(f"LORASCOPE_L2_PREFETCH: bad option {opt!r}; options are mode={'|'.join(MODES)}, programs=N")
    return spec


class L2Prefetcher:
    """Launches prefetches on a side stream forked from the current one; `join` merges it back (a CUDA
    graph capture needs every forked stream joined before it ends)."""

    def __init__(self, spec: PrefetchSpec, device: torch.device):
        self.spec = spec
        self.stream = torch.cuda.Stream(device=device)
        self._sink = torch.zeros(max(1, spec.programs), dtype=torch.float32, device=device)
        self._forked = False

    def __call__(self, target: str, weight: torch.Tensor | None) -> None:
        mb = self.spec.mb.get(target)
        if not mb or weight is None:
            return
        nbytes = min(int(mb * 2**20), weight.numel() * weight.element_size())
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            prefetch_l2(weight, nbytes, self.spec.programs, self.spec.mode, self._sink)
        self._forked = True

    def join(self) -> None:
        if self._forked:
            torch.cuda.current_stream().wait_stream(self.stream)
            self._forked = False


def prefetch_l2(t: torch.Tensor, nbytes: int, programs: int, mode: str, sink: torch.Tensor) -> None:
    """Pull the first `nbytes` of contiguous `t` into L2 with `programs` programs."""
    if not t.is_contiguous():
        raise ValueError("prefetch_l2 wants a contiguous tensor")
    lines = nbytes // _LINE
    if lines == 0:
        return
    per_program = -(-lines // programs)
    block = 1024 if mode != "load" else 16
    _prefetch_kernel[(programs,)](t, sink, lines, per_program,
                                  BLOCK=block, MODE=MODES.index(mode), num_warps=4)


if HAS_TRITON:

    @triton.jit
    def _prefetch_kernel(ptr, sink, lines, per_program, BLOCK: tl.constexpr, MODE: tl.constexpr):
        pid = tl.program_id(0)
        first = pid * per_program
        end = tl.minimum(first + per_program, lines)
        base = ptr.to(tl.pointer_type(tl.uint8))
        if MODE == 2:  # loads: 16 lines a trip, each line as 64 bfloat16-sized words
            acc = tl.zeros([BLOCK, 32], dtype=tl.float32)
            words = base.to(tl.pointer_type(tl.int32))
            for start in range(first, end, BLOCK):
                line = start + tl.arange(0, BLOCK)
                offs = line[:, None] * 32 + tl.arange(0, 32)[None, :]
                x = tl.load(words + offs, mask=(line < end)[:, None], other=0, eviction_policy="evict_last")
                acc += x.to(tl.float32)
            s = tl.sum(tl.sum(acc, axis=1), axis=0)
            tl.store(sink + pid, s, mask=s != s)
        else:
            for start in range(first, end, BLOCK):
                line = start + tl.arange(0, BLOCK)
                line = tl.minimum(line, end - 1)  # past the end: prefetch the last line again (harmless)
                addr = base + line.to(tl.int64) * 128
                if MODE == 0:
                    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                              [addr], dtype=tl.int32, is_pure=False, pack=1)
                else:
                    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                              [addr], dtype=tl.int32, is_pure=False, pack=1)
