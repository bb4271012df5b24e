"""Fused NVFP4 (weight-only) MoE experts in Triton: two grouped GEMMs with in-register dequant.

Reference: `nvfp4_ext.kernels.reference.nvfp4_moe_ref`.

  1. `moe_align_block_size` groups the T*k (token, slot) pairs by expert into M-blocks of one expert each;
     experts without tokens get no block and cost nothing.
  2. `_moe_gate_up_kernel`: for an M-block of expert e and a tile of I columns, accumulates the gate and the
     up projections side by side (rows n and I+n of w13[e]) and applies act(gate) * up in the epilogue, so
     the [T*k, 2I] pre-activation never reaches memory (vLLM writes it and runs the activation separately).
  3. `_moe_down_kernel`: hidden [T*k, I] @ w2[e]^T, scaled by the router weight in the epilogue and
     atomically added (fp32) into the token's output row: the top-k reduction costs no extra pass.
Weights are streamed once per (M-block, N-tile), which is what bounds decode (top-8 of 128 experts at
M=1 reads 8 experts' weights: 8 * 2.97 MB * 0.28 for DiffusionGemma instead of 8 * 2.97 MB * 1 in BF16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4_ext.format import NVFP4_BLOCK_SIZE

from .moe_align import moe_align_block_size
from .nvfp4_tile import load_activation_pair_t, load_nvfp4_tile_pair, marlin_global, row_offsets
from .nvfp4_words import is_packed, pack_nvfp4_weights
from .ops import host_may_read_values, marlin_decode_mode
from .reference import ACTIVATIONS
from .shapes import DIFFUSIONGEMMA_MOE_SHAPE

__all__ = ["DIFFUSIONGEMMA_MOE_SHAPE", "MoeConfig", "TileConfig", "nvfp4_moe_triton", "select_moe_config",
           "shipped_moe_configs"]


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True, slots=True)
class TileConfig:
    """Tile of one grouped GEMM: output columns per program, K step, warps and pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"expected {name} to be a power of two >= 16, got {value}")
        if self.block_k < 2 * NVFP4_BLOCK_SIZE:
            raise ValueError(f"expected block_k >= {2 * NVFP4_BLOCK_SIZE}, got {self.block_k}")


@dataclass(frozen=True, slots=True)
class MoeConfig:
    """Launch configuration of the fused MoE: rows per M-block (shared by both GEMMs) and one tile each."""

    block_m: int
    gate_up: TileConfig
    down: TileConfig

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"expected block_m to be a power of two >= 16, got {self.block_m}")


# Decode: few tokens per expert, so small M-blocks and gate/up tiles of 64 rows each (8 experts x 704/64 =
# 88 programs at M=1; 32-row tiles gave twice the programs but 7.9 instead of 5.3 SASS per weight, sm_90a).
# The down tile is 128 rows x 128 K-columns (8 x 22 = 176 programs at M=1). Gate/up steps take 128 K-columns
# since the word decode freed registers (sm_90a: 3.4 instead of 4.1 SASS per weight at 64; no spill on any
# target). Prefill: many tokens per expert, so bigger M-blocks amortize each weight tile.
_DECODE = MoeConfig(16, gate_up=TileConfig(64, 128, 4, 4), down=TileConfig(128, 128, 4, 4))
_MID = MoeConfig(32, gate_up=TileConfig(64, 64, 4, 3), down=TileConfig(64, 128, 4, 3))
_PREFILL = MoeConfig(64, gate_up=TileConfig(64, 64, 4, 3), down=TileConfig(128, 64, 8, 3))


def select_moe_config(num_tokens: int, num_experts: int, top_k: int) -> MoeConfig:
    """The launch configuration for T tokens: by the mean number of pairs per expert."""
    pairs_per_expert = num_tokens * top_k / max(num_experts, 1)
    if pairs_per_expert <= 4:
        return _DECODE
    if pairs_per_expert <= 32:
        return _MID
    return _PREFILL


def shipped_moe_configs() -> list[tuple[str, int, MoeConfig]]:
    """(shape name, M, config) for DiffusionGemma's experts at the benchmark batch sizes."""
    shape = DIFFUSIONGEMMA_MOE_SHAPE
    experts, top_k = shape["num_experts"], shape["top_k"]
    name = f"experts E={experts} H={shape['hidden']} I={shape['intermediate']} top{top_k}"
    return [(name, m, select_moe_config(m, experts, top_k)) for m in (1, 4, 16, 64, 256, 2048)]


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _moe_gate_up_kernel(
    # Pointers
    x_ptr, w_ptr, scale_ptr, global_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, out_ptr,
    # Dimensions
    num_pairs, inter_size, hidden_size, top_k,
    # Strides (elements)
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ge, stride_om,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACTIVATION: tl.constexpr, MARLIN_DECODE: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must hold whole pairs of 16-element scale blocks")
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(inter_size, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # the grid is sized for the worst case; this block holds no pair

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = offs_pair < num_pairs
    x_rows = x_ptr + row_offsets(offs_pair // top_k, stride_xm)[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter_size
    w_expert = w_ptr + expert * stride_we
    scale_expert = scale_ptr + expert * stride_se

    gate_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # W @ x^T: weights on the MMA's M side
    up_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        x_even, x_odd = load_activation_pair_t(x_rows, mask_m[:, None], k0, hidden_size, HALF_K, DOT_DTYPE)
        gate_even, gate_odd = load_nvfp4_tile_pair(
            w_expert, scale_expert, offs_n, mask_n, k0, hidden_size, stride_wn, stride_sn,
            BLOCK_N, HALF_K, DOT_DTYPE, MARLIN_DECODE,
        )
        up_even, up_odd = load_nvfp4_tile_pair(
            w_expert, scale_expert, offs_n + inter_size, mask_n, k0, hidden_size, stride_wn, stride_sn,
            BLOCK_N, HALF_K, DOT_DTYPE, MARLIN_DECODE,
        )
        gate_t = tl.dot(gate_even, x_even, gate_t, input_precision="ieee")
        gate_t = tl.dot(gate_odd, x_odd, gate_t, input_precision="ieee")
        up_t = tl.dot(up_even, x_even, up_t, input_precision="ieee")
        up_t = tl.dot(up_odd, x_odd, up_t, input_precision="ieee")
    acc_gate = tl.trans(gate_t)
    acc_up = tl.trans(up_t)

    # Epilogue: global scales of the gate and up rows, then the gated activation.
    global_expert = global_ptr + expert * stride_ge
    gate_global = marlin_global(tl.load(global_expert + offs_n, mask=mask_n, other=0.0), MARLIN_DECODE)
    up_global = marlin_global(
        tl.load(global_expert + inter_size + offs_n, mask=mask_n, other=0.0), MARLIN_DECODE
    )
    gate = acc_gate * gate_global[None, :]
    up = acc_up * up_global[None, :]
    if ACTIVATION == 0:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        # gelu_tanh(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3)): 0.5 * (1 + tanh(u)) = sigmoid(2u).
        z = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)
    else:
        z = gate  # silu(g) = g * sigmoid(g)
    # Stable sigmoid: exp of a non-positive argument never overflows.
    e = tl.exp(-tl.abs(z))
    sigmoid = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    hidden = gate * sigmoid * up
    out_ptrs = out_ptr + row_offsets(offs_pair, stride_om)[:, None] + offs_n[None, :]
    tl.store(out_ptrs, hidden.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _moe_down_kernel(
    # Pointers
    h_ptr, w_ptr, scale_ptr, global_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, out_ptr,
    # Dimensions
    num_pairs, hidden_size, inter_size, top_k,
    # Strides (elements)
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ge, stride_om,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    MARLIN_DECODE: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must hold whole pairs of 16-element scale blocks")
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(hidden_size, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = offs_pair < num_pairs
    h_rows = h_ptr + row_offsets(offs_pair, stride_hm)[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden_size
    w_expert = w_ptr + expert * stride_we
    scale_expert = scale_ptr + expert * stride_se

    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # W @ h^T: weights on the MMA's M side
    for k0 in range(0, inter_size, BLOCK_K):
        h_even, h_odd = load_activation_pair_t(h_rows, mask_m[:, None], k0, inter_size, HALF_K, DOT_DTYPE)
        w_even, w_odd = load_nvfp4_tile_pair(
            w_expert, scale_expert, offs_n, mask_n, k0, inter_size, stride_wn, stride_sn,
            BLOCK_N, HALF_K, DOT_DTYPE, MARLIN_DECODE,
        )
        acc_t = tl.dot(w_even, h_even, acc_t, input_precision="ieee")
        acc_t = tl.dot(w_odd, h_odd, acc_t, input_precision="ieee")
    accumulator = tl.trans(acc_t)

    # Epilogue: global scale per output row, router weight per pair, then the top-k sum via fp32 atomics.
    row_global = marlin_global(
        tl.load(global_ptr + expert * stride_ge + offs_n, mask=mask_n, other=0.0), MARLIN_DECODE
    )
    router = tl.load(topk_weights_ptr + offs_pair, mask=mask_m, other=0.0).to(tl.float32)
    accumulator = accumulator * row_global[None, :] * router[:, None]
    out_ptrs = out_ptr + row_offsets(offs_pair // top_k, stride_om)[:, None] + offs_n[None, :]
    tl.atomic_add(out_ptrs, accumulator, mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------- launcher
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_expert_weight(name, qdata, scale, global_scale, experts, rows, k) -> None:
    packed = is_packed(qdata)
    expected = (experts, rows, k // 8 if packed else k // 2)
    if qdata.dtype not in (torch.uint8, torch.int32) or tuple(qdata.shape) != expected or not qdata.is_contiguous():
        raise ValueError(
            f"expected {name} contiguous uint8 [{experts}, {rows}, {k // 2}] (checkpoint bytes) or int32 "
            f"[{experts}, {rows}, {k // 8}] (pack_nvfp4_weights), got {qdata.dtype} {list(qdata.shape)}"
        )
    expected_scale = (experts, rows, k // NVFP4_BLOCK_SIZE)
    scale_dtype = torch.uint8 if packed else torch.float8_e4m3fn
    scale_ok = scale.dtype == scale_dtype and tuple(scale.shape) == expected_scale
    if not (scale_ok and scale.is_contiguous()):
        raise ValueError(
            f"expected {name}_scale contiguous {str(scale_dtype).removeprefix('torch.')} {list(expected_scale)} "
            f"for a {qdata.dtype} {name}, got {scale.dtype} {list(scale.shape)}"
        )
    if tuple(global_scale.shape) not in ((experts,), (experts, rows)):
        raise ValueError(
            f"expected {name}_global [{experts}] or [{experts}, {rows}], got {list(global_scale.shape)}"
        )


def _check_inputs(x, w13, w13_scale, w13_global, w2, w2_scale, w2_global, topk_weights, topk_ids, activation):
    if x.dim() != 2 or x.dtype not in _DOT_DTYPES or x.stride(1) != 1:
        raise ValueError(
            f"expected x as a 2-D fp16/bf16/fp32 tensor with unit stride, got {x.dtype} {list(x.shape)}"
        )
    tokens, hidden = x.shape
    if w13.dim() != 3 or w13.shape[1] % 2:
        raise ValueError(f"expected w13 [E, 2I, H/2], got shape {list(w13.shape)}")
    experts, intermediate = w13.shape[0], w13.shape[1] // 2
    if hidden % NVFP4_BLOCK_SIZE or intermediate % NVFP4_BLOCK_SIZE:
        raise ValueError(
            f"expected hidden and intermediate sizes multiple of 16, got H={hidden} I={intermediate}"
        )
    _check_expert_weight("w13", w13, w13_scale, w13_global, experts, 2 * intermediate, hidden)
    _check_expert_weight("w2", w2, w2_scale, w2_global, experts, hidden, intermediate)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_ids.dtype.is_floating_point:
        raise ValueError(f"expected topk_ids int [{tokens}, k], got {topk_ids.dtype} {list(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"expected topk_weights {list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"expected activation in {ACTIVATIONS}, got {activation!r}")
    # One host sync in eager mode; skipped under capture (the alignment then drops out-of-range ids).
    if topk_ids.numel() and host_may_read_values(topk_ids):
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= experts:
            raise ValueError(f"expected topk_ids in [0, {experts}), got values in [{low}, {high}]")
    return tokens, hidden, intermediate, experts


def _per_row_global(global_scale: torch.Tensor, experts: int, rows: int) -> torch.Tensor:
    return global_scale.to(torch.float32).reshape(experts, -1).expand(experts, rows).contiguous()


def nvfp4_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_global: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "gelu_tanh",
    *,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Launch the fused NVFP4 MoE: alignment, gate/up GEMM + activation, down GEMM + router weights + top-k.

    Args:
        x: [T, H] fp16/bf16 (fp32 for tests); w13: int32 [E, 2I, H/8] words (gate rows first) with
        w13_scale: uint8 codes [E, 2I, H/16] from `nvfp4_words.pack_nvfp4_weights` (what the adapters
        store), or the checkpoint's uint8 [E, 2I, H/2] / e4m3 [E, 2I, H/16], packed here on every call;
        w13_global: float32 [E] or [E, 2I]; w2 / w2_scale: [E, H, I/8] / [E, H, I/16] likewise (or
        [E, H, I/2] / e4m3); w2_global: float32 [E] or [E, H]; topk_weights: [T, k];
        topk_ids: int [T, k] in [0, E) (checked with one host sync, skipped during CUDA-graph capture).
        activation: "gelu_tanh" or "silu".
        config: force a launch configuration (default `select_moe_config`).
    Returns:
        [T, H] in x.dtype.
    Raises:
        ValueError: a dtype, shape, stride or range mismatch, naming the argument.
    """
    tokens, hidden, intermediate, experts = _check_inputs(
        x, w13, w13_scale, w13_global, w2, w2_scale, w2_global, topk_weights, topk_ids, activation
    )
    if not is_packed(w13):
        w13, w13_scale = pack_nvfp4_weights(w13, w13_scale, "w13", check_values=host_may_read_values(w13_scale))
    if not is_packed(w2):
        w2, w2_scale = pack_nvfp4_weights(w2, w2_scale, "w2", check_values=host_may_read_values(w2_scale))
    top_k = topk_ids.shape[1]
    config = config or select_moe_config(tokens, experts, top_k)
    out = torch.zeros((tokens, hidden), dtype=torch.float32, device=x.device)
    if tokens == 0 or top_k == 0:
        return out.to(x.dtype)
    align = moe_align_block_size(topk_ids, config.block_m, experts)
    marlin = marlin_decode_mode(x)
    # Per-row float32 globals ([E, 2I] / [E, H], what the engine adapters precompute at load) pass through
    # without a copy; [E] globals (tests, benchmarks) are expanded here.
    g13 = _per_row_global(w13_global, experts, 2 * intermediate)
    g2 = _per_row_global(w2_global, experts, hidden)
    dot_dtype = _DOT_DTYPES[x.dtype]

    hidden_act = torch.empty((align.num_pairs, intermediate), dtype=x.dtype, device=x.device)
    tile = config.gate_up
    grid = (align.max_blocks * triton.cdiv(intermediate, tile.block_n),)
    _moe_gate_up_kernel[grid](
        x, w13, w13_scale, g13,
        align.sorted_ids, align.expert_ids, align.num_padded, hidden_act,
        align.num_pairs, intermediate, hidden, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1), g13.stride(0),
        hidden_act.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, DOT_DTYPE=dot_dtype,
        ACTIVATION=ACTIVATIONS.index(activation), MARLIN_DECODE=marlin,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )

    router = topk_weights.reshape(-1).float().contiguous()
    tile = config.down
    grid = (align.max_blocks * triton.cdiv(hidden, tile.block_n),)
    _moe_down_kernel[grid](
        hidden_act, w2, w2_scale, g2, router, align.sorted_ids, align.expert_ids,
        align.num_padded, out,
        align.num_pairs, hidden, intermediate, top_k,
        hidden_act.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), w2_scale.stride(1),
        g2.stride(0), out.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, DOT_DTYPE=dot_dtype,
        MARLIN_DECODE=marlin, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out.to(x.dtype)
