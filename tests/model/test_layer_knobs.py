"""The step-path knobs of model/layers.py read from the environment at import: their defaults and the
error a bad value gets (run in a fresh interpreter, as a user's process would read them)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = "import lorascope.model.layers as l; print(l.LORA_FUSION, l.SKINNY_GEMM)"


def _run(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORASCOPE_")}
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def test_defaults_fuse_mid_sized_steps_and_keep_cublas() -> None:
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{'max_tokens': 64, 'min_tokens': 9} {'max_tokens': 0}"


def test_env_sets_the_bound_and_a_bad_value_is_named() -> None:
    proc = _run(LORASCOPE_FUSED_LORA_MAX_TOKENS="0", LORASCOPE_SKINNY_GEMM_MAX_TOKENS="128")
    assert proc.returncode == 0, proc.stderr
    assert "{'max_tokens': 0, 'min_tokens': 9} {'max_tokens': 128}" in proc.stdout
    bad = _run(LORASCOPE_FUSED_LORA_MAX_TOKENS="lots")
    assert bad.returncode != 0
    assert "LORASCOPE_FUSED_LORA_MAX_TOKENS must be a token count (0 turns it off), got 'lots'" in bad.stderr
