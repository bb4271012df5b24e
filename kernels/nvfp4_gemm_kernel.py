"""NVFP4 weight-only (W4A16) GEMM in Triton: y = x @ dequant(W).T, dequantizing W in registers.

Reference: `nvfp4_ext.kernels.reference.nvfp4_gemm_ref`.

Why it is shaped this way
  * On Ampere/Ada/Hopper there are no FP4 tensor cores, so decode (M <= 16) is bound by reading weights:
    4.5 bits/weight instead of 16 is the whole win (<= 3.56x over BF16). The kernel streams packed bytes
    with wide loads and does the E2M1 decode on CUDA cores while the next tiles are in flight.
  * The tile decode (`nvfp4_tile.py`) yields tensor-core operands that are exact in fp16/bf16, split into
    even-K and odd-K halves (two K/2 dots per step). The per-row global scale (fused qkv / gate_up shards
    keep theirs) is applied once to the fp32 accumulator in the epilogue.
  * Decode has few output tiles (N=2816 / 64 = 44 < 132 SMs on H100), so small M splits K across programs
    (split-K) that atomically add fp32 partials (summation order, hence the last fp32 bit, may vary between
    runs); large M uses big tiles and no split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4_ext.format import NVFP4_BLOCK_SIZE

from .nvfp4_tile import load_activation_pair_t, load_nvfp4_tile_pair, marlin_global, row_offsets
from .nvfp4_words import is_packed, pack_nvfp4_weights
from .ops import host_may_read_values, marlin_decode_mode
from .shapes import DIFFUSIONGEMMA_GEMM_SHAPES

__all__ = [
    "DIFFUSIONGEMMA_GEMM_SHAPES",
    "GemmConfig",
    "nvfp4_gemm_triton",
    "select_gemm_config",
    "shipped_configs",
]


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True, slots=True)
class GemmConfig:
    """One launch configuration of `_nvfp4_gemm_kernel` (block_k counts unpacked K elements)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"expected {name} to be a power of two >= 16, got {value}")
        if self.block_k < 2 * NVFP4_BLOCK_SIZE:
            raise ValueError(f"expected block_k >= {2 * NVFP4_BLOCK_SIZE}, got {self.block_k}")
        if self.split_k < 1:
            raise ValueError(f"expected split_k >= 1, got {self.split_k}")


# Shapes of work: decode tiles (split-K fills the GPU unless N alone does), a mid-batch tile and a prefill
# tile. Each is spill-free with both decodes on sm_80/89/90a/100a/120a (tests/test_kernels_aot.py,
# `nvfp4-ext kernels-report`). The split-K decode tile takes 256 K-columns per step: the K loop's fixed
# work (barriers, activation staging, addresses) spreads over 4x the weights of a 64-column step (sm_90a,
# words-layout decode: 3.6 SASS per weight; `kernels/roofline.py` predicts it no slower at M=1 on any of
# its GPUs, although mlp_down then splits K 4 ways instead of 8). The mid tile is 64x128x64 with 8 warps
# (sm_90a: 5.4 against 6.0 for 64x64x64 w4; 64x128x64 w4 (4.5) and 64x64x128 (5.6) spill with the
# portable decode on sm_89 / sm_120a).
_DECODE = GemmConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=3)
# When N alone fills the GPU (LM head) no split is needed and a wider tile decodes with fewer instructions
# per weight (sm_90a, words-layout decode: 3.3, no spill).
_DECODE_WIDE = GemmConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4)
_MID = GemmConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4)
_PREFILL = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
_TARGET_PROGRAMS = 264  # two waves on a 132-SM H100; also > 1 wave on A100 (108 SMs)


def _split_k_for(n: int, k: int, block_n: int, block_k: int) -> int:
    """Smallest power-of-two split that gives ~two waves of programs while keeping >= 2 K-steps each."""
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split < _TARGET_PROGRAMS and k // (2 * split) >= 2 * block_k:
        split *= 2
    return split


def select_gemm_config(m: int, n: int, k: int) -> GemmConfig:
    """The launch configuration for one (M, N, K): by M bucket, with split-K sized from N and K."""
    if m <= 16:
        base = _DECODE
    elif m <= 64:
        base = _MID
    else:
        return _PREFILL
    split = _split_k_for(n, k, base.block_n, base.block_k)
    if base is _DECODE and triton.cdiv(n, _DECODE_WIDE.block_n) >= _TARGET_PROGRAMS:
        return _DECODE_WIDE
    return GemmConfig(base.block_m, base.block_n, base.block_k, split, base.num_warps, base.num_stages)


def shipped_configs() -> list[tuple[str, int, GemmConfig]]:
    """(shape name, M bucket, config) for every DiffusionGemma shape and M bucket (the AOT-compiled set)."""
    rows = []
    for name, n, k in DIFFUSIONGEMMA_GEMM_SHAPES:
        for m in (1, 16, 64, 256):
            rows.append((f"{name} N={n} K={k}", m, select_gemm_config(m, n, k)))
    return rows


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _nvfp4_gemm_kernel(
    # Pointers
    x_ptr, w_ptr, scale_ptr, global_ptr, bias_ptr, out_ptr,
    # Matrix dimensions
    M, N, K, k_per_split,
    # Strides (elements)
    stride_xm, stride_wn, stride_sn, stride_om, stride_on,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, MARLIN_DECODE: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must hold whole pairs of 16-element scale blocks")
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Activation rows stay int32 (M * K < 2**31 below ~760k tokens at K=2816): int64 here costs 24 registers
    # and spills on sm_80 (PTX-decode mid tile). The output offsets (M * N, 2**31 at an LM head's 8192
    # tokens) are int64.
    x_rows = x_ptr + offs_m[:, None] * stride_xm

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # W @ x^T: weights on the MMA's M side
    for k0 in range(k_start, k_end, BLOCK_K):
        x_even, x_odd = load_activation_pair_t(x_rows, mask_m[:, None], k0, k_end, HALF_K, DOT_DTYPE)
        w_even, w_odd = load_nvfp4_tile_pair(
            w_ptr, scale_ptr, offs_n, mask_n, k0, k_end, stride_wn, stride_sn, BLOCK_N, HALF_K, DOT_DTYPE,
            MARLIN_DECODE,
        )
        acc_t = tl.dot(w_even, x_even, acc_t, input_precision="ieee")
        acc_t = tl.dot(w_odd, x_odd, acc_t, input_precision="ieee")
    accumulator = tl.trans(acc_t)

    # Epilogue: per-row global multiplier, then bias and the output dtype (or an fp32 split-K partial).
    row_global = marlin_global(tl.load(global_ptr + offs_n, mask=mask_n, other=0.0), MARLIN_DECODE)
    accumulator = accumulator * row_global[None, :]
    out_offsets = row_offsets(offs_m, stride_om)[:, None] + offs_n[None, :] * stride_on
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            accumulator += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offsets, accumulator.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        # fp32 atomics resolve in L2: far cheaper than a [SPLIT_K, M, N] workspace round trip through DRAM.
        tl.atomic_add(out_ptr + out_offsets, accumulator, mask=mask_out)


# ---------------------------------------------------------------------------------------------- launcher
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_inputs(x, weight, weight_scale, global_scale, bias) -> tuple[int, int, int]:
    if x.dim() != 2 or x.dtype not in _DOT_DTYPES:
        raise ValueError(f"expected x as a 2-D fp16/bf16/fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if k % NVFP4_BLOCK_SIZE:
        raise ValueError(f"expected K to be a multiple of {NVFP4_BLOCK_SIZE}, got K={k}")
    if x.stride(1) != 1:
        raise ValueError(f"expected x with unit stride along K, got strides {x.stride()}")
    packed = is_packed(weight)
    per_row = k // 8 if packed else k // 2
    if weight.dim() != 2 or weight.shape[1] != per_row or weight.dtype not in (torch.uint8, torch.int32):
        raise ValueError(
            f"expected weight uint8 [N, {k // 2}] (checkpoint bytes) or int32 [N, {k // 8}] (pack_nvfp4_weights), "
            f"got {weight.dtype} {tuple(weight.shape)}"
        )
    n = weight.shape[0]
    if not weight.is_contiguous():
        raise ValueError("expected a contiguous weight, got a strided view")
    expected_scale = (n, k // NVFP4_BLOCK_SIZE)
    scale_dtype = torch.uint8 if packed else torch.float8_e4m3fn
    if weight_scale.dtype != scale_dtype or tuple(weight_scale.shape) != expected_scale:
        raise ValueError(
            f"expected weight_scale {str(scale_dtype).removeprefix('torch.')} {list(expected_scale)} for a "
            f"{weight.dtype} weight, got {weight_scale.dtype} {list(weight_scale.shape)}"
        )
    if not weight_scale.is_contiguous():
        raise ValueError("expected a contiguous weight_scale, got a strided view")
    if global_scale.numel() not in (1, n):
        raise ValueError(f"expected global_scale 0-d or [{n}], got shape {list(global_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"expected bias [{n}], got shape {list(bias.shape)}")
    for name, tensor in (("weight", weight), ("weight_scale", weight_scale), ("global_scale", global_scale)):
        if tensor.device != x.device:
            raise ValueError(f"expected {name} on {x.device}, got {tensor.device}")
    return m, n, k


def nvfp4_gemm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Launch `_nvfp4_gemm_kernel`.

    Args:
        x: [M, K] fp16/bf16 (fp32 for tests) activations, unit stride along K; K a multiple of 16.
        weight, weight_scale: int32 [N, K/8] words and uint8 [N, K/16] scale codes from
            `nvfp4_words.pack_nvfp4_weights` (what the engine adapters store), or the checkpoint's uint8
            [N, K/2] / float8_e4m3fn [N, K/16], packed here on every call (tests, benchmarks). Contiguous.
        global_scale: float32 multiplier, 0-d or [N].
        bias: optional [N].
        config: force a launch configuration (default `select_gemm_config(M, N, K)`).
    Returns:
        [M, N] in x.dtype.
    Raises:
        ValueError: a dtype, shape, stride or device mismatch, naming the argument.
    """
    m, n, k = _check_inputs(x, weight, weight_scale, global_scale, bias)
    if not is_packed(weight):
        weight, weight_scale = pack_nvfp4_weights(
            weight, weight_scale, check_values=host_may_read_values(weight_scale)
        )
    config = config or select_gemm_config(m, n, k)
    marlin = marlin_decode_mode(x)
    # A float32 [N] global (what the engine adapters precompute at load) is passed as is: no per-call copy.
    row_global = global_scale.to(torch.float32).reshape(-1).expand(n).contiguous()
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    target = out if split_k == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split_k)
    _nvfp4_gemm_kernel[grid](
        x, weight, weight_scale, row_global,
        bias if bias is not None else row_global, target,
        m, n, k, k_per_split,
        x.stride(0), weight.stride(0), weight_scale.stride(0), target.stride(0), target.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_DTYPE=_DOT_DTYPES[x.dtype], HAS_BIAS=bias is not None, SPLIT_K=split_k, MARLIN_DECODE=marlin,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k == 1:
        return out
    if bias is not None:
        target += bias.float()
    return target.to(x.dtype)
