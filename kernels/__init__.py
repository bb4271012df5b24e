"""Triton kernels for NVFP4 and FP8 weights (installed as `nvfp4_ext.kernels`); importable without Triton.

Public API: the ops (`nvfp4_gemm`, `nvfp4_moe`, `fp8_gemm`), which pick the Triton kernel or the pure-torch
reference per call, the references themselves (`*_ref`), and the same ops as `torch.ops.nvfp4_ext.*`
custom operators for compiled engines (`library.py`). The Triton modules (`nvfp4_gemm_kernel`,
`nvfp4_moe_kernel`, `fp8_gemm_kernel`, `moe_align`, `report`) import Triton and load only when a Triton
backend runs. They carry a `_kernel` suffix because a submodule named like an op would replace the op on
the package once imported (Python binds every imported submodule as an attribute of its package).
"""

from __future__ import annotations

from . import library  # noqa: F401  (registers torch.ops.nvfp4_ext.{nvfp4_gemm, nvfp4_moe, fp8_gemm})
from .ops import fp8_gemm, interpreter_enabled, nvfp4_gemm, nvfp4_moe
from .reference import apply_gated_activation, fp8_gemm_ref, nvfp4_gemm_ref, nvfp4_moe_ref

__all__ = [
    "apply_gated_activation",
    "fp8_gemm",
    "fp8_gemm_ref",
    "interpreter_enabled",
    "nvfp4_gemm",
    "nvfp4_gemm_ref",
    "nvfp4_moe",
    "nvfp4_moe_ref",
]
