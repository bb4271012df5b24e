"""The ops as `torch.ops.nvfp4_ext.*` custom operators, opaque to torch.compile and CUDA-graph friendly.

Engines that compile their models (vLLM's `torch.compile` with fullgraph) cannot trace the launchers'
shape-dependent Python (config choice, MoE alignment), so they call these instead:

    torch.ops.nvfp4_ext.nvfp4_gemm(x, weight, weight_scale, global_scale, bias, "auto")
    torch.ops.nvfp4_ext.nvfp4_moe(x, w13, w13_scale, w13_global, w2, w2_scale, w2_global,
                                  topk_weights, topk_ids, "gelu_tanh", "auto")
    torch.ops.nvfp4_ext.fp8_gemm(x, weight, weight_scale, bias, "auto")

Each has a fake (meta) implementation giving the output shape and dtype, so compilation needs no data.
"""

from __future__ import annotations

import torch

from .ops import fp8_gemm, nvfp4_gemm, nvfp4_moe

__all__ = ["LIBRARY"]

LIBRARY = "nvfp4_ext"

_GEMM_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor global_scale, Tensor? bias, str backend) -> Tensor"
)
_MOE_SCHEMA = (
    "(Tensor x, Tensor w13, Tensor w13_scale, Tensor w13_global, Tensor w2, Tensor w2_scale, "
    "Tensor w2_global, Tensor topk_weights, Tensor topk_ids, str activation, str backend) -> Tensor"
)
_FP8_SCHEMA = "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str backend) -> Tensor"


@torch.library.custom_op(f"{LIBRARY}::nvfp4_gemm", mutates_args=(), schema=_GEMM_SCHEMA)
def _nvfp4_gemm_op(x, weight, weight_scale, global_scale, bias, backend):
    return nvfp4_gemm(x, weight, weight_scale, global_scale, bias, backend=backend)


@_nvfp4_gemm_op.register_fake
def _nvfp4_gemm_fake(x, weight, weight_scale, global_scale, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op(f"{LIBRARY}::nvfp4_moe", mutates_args=(), schema=_MOE_SCHEMA)
def _nvfp4_moe_op(
    x, w13, w13_scale, w13_global, w2, w2_scale, w2_global, topk_weights, topk_ids, activation, backend
):
    return nvfp4_moe(
        x,
        w13,
        w13_scale,
        w13_global,
        w2,
        w2_scale,
        w2_global,
        topk_weights,
        topk_ids,
        activation,
        backend=backend,
    )


@_nvfp4_moe_op.register_fake
def _nvfp4_moe_fake(
    x, w13, w13_scale, w13_global, w2, w2_scale, w2_global, topk_weights, topk_ids, activation, backend
):
    return torch.empty_like(x)


@torch.library.custom_op(f"{LIBRARY}::fp8_gemm", mutates_args=(), schema=_FP8_SCHEMA)
def _fp8_gemm_op(x, weight, weight_scale, bias, backend):
    return fp8_gemm(x, weight, weight_scale, bias, backend=backend)


@_fp8_gemm_op.register_fake
def _fp8_gemm_fake(x, weight, weight_scale, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))
