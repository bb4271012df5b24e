"""Importing SGLang on a CPU-only machine with CPU torch, for unit tests of the adapter.

SGLang's core imports `torchvision.transforms` (via its multimodal configs). PyPI only has CUDA builds of
torchvision; beside CPU torch their C++ ops fail to load, and `import torchvision` then dies while
registering fake kernels for `torchvision::nms` / `qnms`, which no loaded library defined. vLLM's CPU
build breaks the same way when such a torchvision is importable, which is why the CI install keeps it in
a side directory (`<venv>/sglang-extras`) that only SGLang test processes put on `sys.path`.
`prepare_cpu_import()` defines the two op schemas (nothing else: torchvision's image ops stay unusable,
SGLang's text paths never call them) and adds that directory. GPU installs never need this.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

__all__ = ["EXTRAS_ENV", "extras_dir", "prepare_cpu_import"]

EXTRAS_ENV = "NVFP4_EXT_SGLANG_EXTRAS"
_TORCHVISION_FAKE_OPS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def extras_dir() -> Path:
    """The side directory holding torchvision for SGLang tests: $NVFP4_EXT_SGLANG_EXTRAS, else
    `<sys.prefix>/sglang-extras` (where scripts/install.sh puts it)."""
    return Path(os.environ.get(EXTRAS_ENV) or Path(sys.prefix) / "sglang-extras")


def _op_defined(name: str) -> bool:
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{name}", "CPU")
    except RuntimeError:
        return False
    return True


def prepare_cpu_import() -> None:
    """Make `import sglang` work beside CPU torch (idempotent; a no-op where torch has CUDA)."""
    if torch.version.cuda is not None:
        return
    side = extras_dir()
    if side.is_dir() and str(side) not in sys.path:
        sys.path.append(str(side))
    for name, schema in _TORCHVISION_FAKE_OPS.items():
        if not _op_defined(name):
            torch.library.define(f"torchvision::{name}", schema)
