"""Triton kernels for NVFP4 and FP8 weights (installed as `nvfp4_ext.kernels`); importable without Triton.

Public API: the ops (`nvfp4_gemm`, `nvfp4_moe`, `fp8_gemm`), which pick the Triton kernel or the pure-torch
reference per call, and the references themselves (`*_ref`). The Triton modules (`nvfp4_gemm`, `nvfp4_moe`,
`fp8_gemm`, `moe_align`, `report`) import Triton and are loaded only when a Triton backend runs.
"""

from __future__ import annotations

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
