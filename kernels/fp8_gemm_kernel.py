"""FP8 (e4m3) weight-only W8A16 GEMM in Triton, for GPUs without FP8 tensor cores (sm_80, sm_86) and layers
`torch._scaled_mm` cannot take (block scales; per-channel scales on sm_12x).

Reference: `nvfp4_ext.kernels.reference.fp8_gemm_ref`. Otherwise GPUs with FP8 tensor cores (sm_89+) use
`torch._scaled_mm` (see `ops.fp8_gemm` / `ops.fp8_path`).

Weights are loaded as bytes (sm_80 has no e4m3 type) and decoded in registers; an e4m3 value has 4
significant bits and lies in [2**-9, 448], so it is exact as an fp16 or bf16 tensor-core operand. Per-tensor
and per-channel scales multiply the fp32 accumulator once in the epilogue; 128x128 block scales change
along K, so each K step's partial product is scaled before it is accumulated (BLOCK_K divides 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4_ext.format import FP8_BLOCK

from .nvfp4_gemm_kernel import GemmConfig, _split_k_for
from .nvfp4_tile import e4m3_to_float, row_offsets

__all__ = ["fp8_gemm_triton", "select_fp8_config", "shipped_fp8_configs"]

# Like the NVFP4 tiles, but BLOCK_K must divide the 128-wide scale blocks. W8A16 decode streams twice the
# bytes of NVFP4, so the decode tile keeps four stages in flight.
_DECODE = GemmConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
_MID = GemmConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=3)
_PREFILL = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def select_fp8_config(m: int, n: int, k: int) -> GemmConfig:
    """The launch configuration for one (M, N, K), with split-K for small M as in the NVFP4 GEMM."""
    if m > 64:
        return _PREFILL
    base = _DECODE if m <= 16 else _MID
    split = _split_k_for(n, k, base.block_n, base.block_k)
    return GemmConfig(base.block_m, base.block_n, base.block_k, split, base.num_warps, base.num_stages)


def shipped_fp8_configs() -> list[tuple[str, int, GemmConfig]]:
    """(shape name, M, config) for the AOT tests: a DiffusionGemma-sized layer at each M bucket."""
    return [("fp8 N=2816 K=2816", m, select_fp8_config(m, 2816, 2816)) for m in (1, 64, 256)]


@triton.jit
def _fp8_gemm_kernel(
    # Pointers
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    # Matrix dimensions
    M, N, K, k_per_split,
    # Strides (elements)
    stride_xm, stride_wn, stride_sb, stride_om, stride_on,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_SCALES: tl.constexpr, SCALE_BLOCK: tl.constexpr,
):
    if BLOCK_SCALES:
        tl.static_assert(SCALE_BLOCK % BLOCK_K == 0, "BLOCK_K must divide the scale block")
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < k_end
        x_ptrs = x_ptr + row_offsets(offs_m, stride_xm)[:, None] + cols[None, :]
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = x.to(tl.float32).to(DOT_DTYPE)  # upcast first: the interpreter computes bf16 wrongly
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + cols[:, None]
        raw = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        w = e4m3_to_float(raw).to(DOT_DTYPE)
        if BLOCK_SCALES:
            scale_ptrs = scale_ptr + (offs_n // SCALE_BLOCK) * stride_sb + k0 // SCALE_BLOCK
            block_scale = tl.load(scale_ptrs, mask=mask_n, other=0.0)
            partial = tl.dot(x, w, input_precision="ieee")
            accumulator += partial * block_scale[None, :]
        else:
            accumulator = tl.dot(x, w, accumulator, input_precision="ieee")

    if not BLOCK_SCALES:
        accumulator = accumulator * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out_offsets = row_offsets(offs_m, stride_om)[:, None] + offs_n[None, :] * stride_on
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            accumulator += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offsets, accumulator.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.atomic_add(out_ptr + out_offsets, accumulator, mask=mask_out)


_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _scale_layout(weight_scale: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, bool]:
    """(float32 scales, is_block): per-tensor/per-channel become [N]; 128x128 blocks stay 2-D."""
    scale = weight_scale.float()
    if scale.numel() == 1:
        return scale.reshape(1).expand(n).contiguous(), False
    if scale.numel() == n and (scale.dim() == 1 or tuple(scale.shape) == (n, 1)):
        return scale.reshape(n).contiguous(), False
    blocks = (triton.cdiv(n, FP8_BLOCK[0]), triton.cdiv(k, FP8_BLOCK[1]))
    if tuple(scale.shape) == blocks:
        return scale.contiguous(), True
    raise ValueError(
        f"expected weight_scale 0-d, [{n}], [{n}, 1] or {list(blocks)} (128x128 blocks), "
        f"got {list(scale.shape)}"
    )


def fp8_gemm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Launch `_fp8_gemm_kernel` (W8A16).

    Args:
        x: [M, K] fp16/bf16 (fp32 for tests) with unit stride along K.
        weight: contiguous float8_e4m3fn [N, K].
        weight_scale: float32 0-d/[1], [N]/[N, 1] or [ceil(N/128), ceil(K/128)].
        bias: optional [N].
        config: force a launch configuration (default `select_fp8_config`); block_k must divide 128.
    Returns:
        [M, N] in x.dtype.
    Raises:
        ValueError: a dtype, shape, stride or device mismatch, naming the argument.
    """
    if x.dim() != 2 or x.dtype not in _DOT_DTYPES or x.stride(1) != 1:
        raise ValueError(
            f"expected x as a 2-D fp16/bf16/fp32 tensor with unit stride, got {x.dtype} {list(x.shape)}"
        )
    m, k = x.shape
    if (
        weight.dtype != torch.float8_e4m3fn
        or weight.dim() != 2
        or weight.shape[1] != k
        or not weight.is_contiguous()
    ):
        raise ValueError(
            f"expected weight contiguous float8_e4m3fn [N, {k}], got {weight.dtype} {list(weight.shape)}"
        )
    n = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"expected bias [{n}], got shape {list(bias.shape)}")
    scale, block_scales = _scale_layout(weight_scale, n, k)
    config = config or select_fp8_config(m, n, k)
    if block_scales and FP8_BLOCK[1] % config.block_k:
        raise ValueError(f"expected block_k dividing {FP8_BLOCK[1]} for block scales, got {config.block_k}")
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    target = out if split_k == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split_k)
    _fp8_gemm_kernel[grid](
        x, weight.view(torch.uint8), scale, bias if bias is not None else scale, target,
        m, n, k, k_per_split,
        x.stride(0), weight.stride(0), scale.stride(0), target.stride(0), target.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_DTYPE=_DOT_DTYPES[x.dtype], HAS_BIAS=bias is not None, SPLIT_K=split_k,
        BLOCK_SCALES=block_scales, SCALE_BLOCK=FP8_BLOCK[0],
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k == 1:
        return out
    if bias is not None:
        target += bias.float()
    return target.to(x.dtype)
