"""Markers shared by the kernel test files.

Imported as `from _kernel_marks import kernel_test`: pytest's default ("prepend") import mode puts
tests/ on sys.path to load tests/conftest.py (tests/ is not a package), so this works for any run
from the repository root or a subdirectory, including the TRITON_INTERPRET=1 reruns of one file.
"""

from __future__ import annotations

import os

import pytest
import torch

from lorascope.kernels.fused_triton import HAS_TRITON

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# A `test_kernel_*` test: runs on a CUDA device, or on the CPU under Triton's interpreter (each file's
# `test_kernels_under_triton_interpreter` reruns it with TRITON_INTERPRET=1, selecting these).
kernel_test = pytest.mark.skipif(
    not (HAS_TRITON and (HAS_CUDA or INTERPRETED)),
    reason="no CUDA device (or no triton): test_kernels_under_triton_interpreter runs these on the CPU",
)


def run_file_under_interpreter(path: str) -> None:
    """Rerun the `test_kernel_*` tests of the file at `path` with TRITON_INTERPRET=1 (set before triton is
    imported) in a subprocess; fails unless some ran and none skipped."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "test_kernel_",
                           path], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-1000:]
