"""`torch.ops.nvfp4_ext.nvfp4_linear`: the NVFP4 linear forward of both adapters as one opaque custom op.

Compiled engines (vLLM's fullgraph `torch.compile`, SGLang's `--enable-torch-compile`) see only its fake
implementation (output shape and dtype), never the launchers' shape-dependent Python (config choice,
Triton launch, FlashInfer quantization), the same way the kernel ops of `nvfp4_ext.kernels.library` work.
"""

from __future__ import annotations

import torch

from .common import nvfp4_linear_forward

__all__ = ["NVFP4_LINEAR_OP"]

NVFP4_LINEAR_OP = "nvfp4_ext::nvfp4_linear"
_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor global_per_row, Tensor? bias, "
    "Tensor? input_global, Tensor? weight_scale_swizzled, Tensor? input_global_inv, str backend) -> Tensor"
)


@torch.library.custom_op(NVFP4_LINEAR_OP, mutates_args=(), schema=_SCHEMA)
def _nvfp4_linear_op(
    x, weight, weight_scale, global_per_row, bias, input_global, weight_scale_swizzled, input_global_inv,
    backend,
):
    return nvfp4_linear_forward(
        x,
        weight,
        weight_scale,
        global_per_row,
        bias,
        backend,
        input_global=input_global,
        weight_scale_swizzled=weight_scale_swizzled,
        input_global_inv=input_global_inv,
    )


@_nvfp4_linear_op.register_fake
def _nvfp4_linear_fake(
    x, weight, weight_scale, global_per_row, bias, input_global, weight_scale_swizzled, input_global_inv,
    backend,
):
    # N from the per-row globals: a FlashInfer layer's weight carries padding rows.
    return x.new_empty((*x.shape[:-1], global_per_row.shape[0]))
