"""W4A4 NVFP4 in pure torch, computing what FlashInfer's FP4 path computes (`NVFP4_EXT_BACKEND=emulated`).

The native path quantizes activations with `flashinfer.fp4_quantize(x, 1 / input_scale)` and multiplies
FP4 x FP4 on tensor cores (`flashinfer.mm_fp4`, fp32 accumulation, `alpha = input_scale`). Here the same
steps run as torch ops on any device, so the W4A4 numerics are testable on a CPU and comparable with the
GPU kernel on sm >= 100.

Activation quantization follows FlashInfer 0.7's `cvt_warp_fp16_to_fp4` (default, fast-math branch), per
16-element block of a row, with `sf_scale = 1 / input_scale`:

    vec_max   = max |x|                                    (exact, in the input dtype)
    sf        = sf_scale * (vec_max * fl32(1/6))          -> e4m3 round-to-nearest-even, saturating at 448
    out_scale = 1 / (fp32(sf_e4m3) * fl32(1/sf_scale))     (0 when the e4m3 scale is 0)
    code      = e2m1(x * out_scale)                        round-to-nearest-even, saturating at +-6

FlashInfer computes the three reciprocals with `rcp.approx.ftz.f32`, which may differ from the correctly
rounded reciprocal used here by one ulp; that can move a value lying within a few ulps of an e2m1 rounding
boundary to the neighbouring code. Everything else is bit-exact IEEE float32.

Known differences from ModelOpt's `NVFP4QTensor.quantize` (the oracle the tests use): an all-zero block
gets scale byte 0 here (FlashInfer) and 1.0 in ModelOpt, and a block whose scale underflows e4m3
(`vec_max < 6 * input_scale * 2**-10`) is flushed to zero here while ModelOpt clamps its scale to 2**-9;
the dequantized values of zero blocks agree, tiny underflow blocks do not.
"""

from __future__ import annotations

import torch

from nvfp4_ext.format import (
    F8E4M3_MAX,
    NVFP4_BLOCK_SIZE,
    cast_to_e2m1,
    e2m1_to_float,
    unpack_uint4,
)

from .reference import Activation, apply_gated_activation

__all__ = [
    "fp4_quantize_emulated",
    "nvfp4_w4a4_gemm_emulated",
    "nvfp4_w4a4_moe_emulated",
]

# FlashInfer's rcp(6.0f): a float32 tensor times a Python float multiplies by the float rounded to float32.
_ONE_SIXTH = 1.0 / 6.0


def fp4_quantize_emulated(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations as `flashinfer.fp4_quantize(x, 1 / input_scale)` does (unswizzled scales).

    Args:
        x: [M, K] activations (bf16, fp16 or fp32); K a multiple of 16.
        input_scale: 0-d/[1] float32 static activation multiplier (ModelOpt's `input_scale`, amax / 2688).
    Returns:
        (codes uint8 [M, K] with values 0..15, bit 3 = sign; block scales float8_e4m3fn [M, K/16]).
    """
    if x.shape[-1] % NVFP4_BLOCK_SIZE:
        raise ValueError(f"activations need K % {NVFP4_BLOCK_SIZE} == 0, got shape {tuple(x.shape)}")
    blocks = x.reshape(*x.shape[:-1], -1, NVFP4_BLOCK_SIZE)
    vec_max = blocks.abs().amax(-1).float()  # the max is exact in the input dtype
    sf_scale = 1.0 / input_scale.float().reshape(())  # what our FlashInfer call passes as global scale
    sf = sf_scale * (vec_max * _ONE_SIXTH)
    sf_e4m3 = sf.clamp(max=F8E4M3_MAX).to(torch.float8_e4m3fn)  # __nv_fp8_e4m3(float): RNE, satfinite
    sf_value = sf_e4m3.float()
    reciprocal_sf_scale = 1.0 / sf_scale
    nonzero = sf_value != 0
    safe_sf = torch.where(nonzero, sf_value, 1.0)
    out_scale = torch.where(nonzero, 1.0 / (safe_sf * reciprocal_sf_scale), 0.0)
    scaled = blocks.float() * out_scale.unsqueeze(-1)
    codes = cast_to_e2m1(scaled).reshape(x.shape)  # RNE, saturating at +-6 (cvt.rn.satfinite.e2m1x2)
    return codes, sf_e4m3


def _dequantize_codes(codes: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """codes [..., K] * their e4m3 block scales, in float32 (every product is exact in float32)."""
    values = e2m1_to_float(codes).reshape(*codes.shape[:-1], -1, NVFP4_BLOCK_SIZE)
    return (values * block_scale.float().unsqueeze(-1)).flatten(-2)


def _w4a4_matmul(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor
) -> torch.Tensor:
    """alpha * (fp4(x) @ fp4(W).T) with fp32 accumulation, alpha = input_scale (FlashInfer's mm_fp4)."""
    codes, x_scale = fp4_quantize_emulated(x, input_scale)
    x_fp4 = _dequantize_codes(codes, x_scale)
    w_fp4 = _dequantize_codes(unpack_uint4(weight), weight_scale)
    return (x_fp4 @ w_fp4.t()) * input_scale.float().reshape(())


def nvfp4_w4a4_gemm_emulated(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    global_per_row: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor,
) -> torch.Tensor:
    """y = alpha * fp4(x) @ fp4(W).T * global (+ bias), as the FlashInfer W4A4 linear computes it.

    Args:
        x: [M, K]; weight uint8 [N, K/2]; weight_scale e4m3 [N, K/16]; global_per_row float32 [N] (or 0-d).
        bias: optional [N].
        input_scale: 0-d/[1] float32 activation multiplier.
    Returns:
        [M, N] in x.dtype. For 16-bit activations the GEMM result is rounded to bf16 before the per-row
        global, like `mm_fp4(..., out_dtype=bfloat16)`; fp32 activations keep fp32 throughout.
    """
    out = _w4a4_matmul(x, weight, weight_scale, input_scale)
    if x.dtype in (torch.bfloat16, torch.float16):
        out = out.to(torch.bfloat16).float()
    out = out * global_per_row.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def nvfp4_w4a4_moe_emulated(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_global: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Activation,
    w13_input_scale: torch.Tensor,
    w2_input_scale: torch.Tensor,
) -> torch.Tensor:
    """Routed W4A4 experts: each expert quantizes its input under its own w13 input scale and its gated
    activation under its w2 input scale, then runs the emulated FP4 GEMMs (fp32 in between).

    Every expert runs on every token and the routing weights (zero for unrouted pairs) mask the sum, so the
    op has no data-dependent shapes (safe under CUDA-graph capture and FakeTensorMode); it is a validation
    path, not a fast one.

    Args:
        x: [T, H]; w13 uint8 [E, 2I, H/2]; w13_scale e4m3 [E, 2I, H/16]; w13_global float32 [E, 2I];
        w2 uint8 [E, H, I/2]; w2_scale e4m3 [E, H, I/16]; w2_global float32 [E, H];
        topk_weights float [T, k]; topk_ids int [T, k]; activation "gelu_tanh" or "silu";
        w13_input_scale, w2_input_scale: float32 [E] activation multipliers.
    Returns:
        [T, H] in x.dtype.
    """
    intermediate = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for expert in range(w13.shape[0]):
        routed = ((topk_ids == expert).float() * topk_weights.float()).sum(-1)  # [T], 0 if not routed
        gate_up = _w4a4_matmul(x, w13[expert], w13_scale[expert], w13_input_scale[expert])
        gate_up = gate_up * w13_global[expert].float()
        hidden = apply_gated_activation(gate_up[:, :intermediate], gate_up[:, intermediate:], activation)
        down = _w4a4_matmul(hidden, w2[expert], w2_scale[expert], w2_input_scale[expert])
        out = out + routed.unsqueeze(1) * (down * w2_global[expert].float())
    return out.to(x.dtype)
