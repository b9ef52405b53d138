"""LORASCOPE_L2_PREFETCH parsing (kernels/l2_prefetch.py): the spec, and a clear error for each mistake.
The prefetch itself changes no token: tests/engine/test_cuda_graphs.py (GPU)."""

from __future__ import annotations

import pytest

from lorascope.kernels.l2_prefetch import PrefetchSpec, parse_spec


def test_spec_parses_targets_mode_and_programs() -> None:
    assert parse_spec("o=34,gate_up=16.5;mode=load;programs=64") == PrefetchSpec({"o": 34.0, "gate_up": 16.5}, "load", 64)
    assert parse_spec("qkv=8") == PrefetchSpec({"qkv": 8.0}, "prefetch", 32)


@pytest.mark.parametrize(("text", "names"), [
    ("", "o=34"), ("x=1", "unknown target 'x'"), ("o=a", "needs MB as a number"),
    ("o=1;mode=zap", "bad option 'mode=zap'"), ("o=1;programs=0", "bad option 'programs=0'"),
])
def test_bad_spec_names_the_problem(text: str, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        parse_spec(text)
