"""What the Triton kernel modules share: the optional import (the CPU engine never calls them;
`HAS_TRITON` says whether it can), whether Triton's CPU interpreter runs them, and shape helpers.

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


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())
