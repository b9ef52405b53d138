"""What the Triton kernel modules share: the optional import (the CPU engine never calls them;
`HAS_TRITON` says whether it can), whether Triton's CPU interpreter runs them, and shape helpers.

Programmatic dependent launch (`PDL`, env LORASCOPE_PDL=1, off by default): the step's Triton kernels
launch with `launch_pdl` and get a `PDL` constexpr. Such a kernel may start while the kernel before it
on the stream still runs; each one first reads only what no kernel of the step writes (weights, the
step's metadata), then waits for the previous launch to finish and flush (`gdc_wait`) before it reads
anything else or writes at all, then lets the next launch start (`gdc_launch_dependents`). The wait is
transitive (the previous launch finished its own wait), so a kernel also sees every earlier kernel's
writes. Kernels launched without PDL (cuBLAS, torch ops) keep their full ordering either side. Used on
sm_90+ CUDA devices only, never under the interpreter (which has no grid-dependency control).

Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported: the CPU tests) computes
bfloat16 dots wrongly and truncates float32 -> bfloat16 instead of rounding to nearest (triton 3.9);
under it the kernels take half-precision dot operands up to float32 (lora_triton.py says more).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
NUM_SMS = 132  # H200: the split-K heuristics aim at a few programs per SM
PDL: dict[str, bool] = {"enabled": os.environ.get("LORASCOPE_PDL", "0") not in ("", "0")}
_SM90: dict[int, bool] = {}


def pdl_args(t, want: bool | None = None) -> dict:
    """The launch kwargs of a PDL-capable kernel for inputs on t's device: {"PDL": flag} plus
    launch_pdl=True when the flag is on: wanted (`want`, or else the PDL knob), t on an sm_90+ CUDA
    device, not interpreted."""
    on = (PDL["enabled"] if want is None else want) and not INTERPRETED and t.is_cuda
    if on:
        idx = t.device.index if t.device.index is not None else 0
        if idx not in _SM90:
            import torch

            _SM90[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
        on = _SM90[idx]
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())
