"""Pure-torch references of every kernel in `nvfp4_ext.kernels` (also the CPU path).

Each function here defines what its Triton kernel must compute: float32 math on weights dequantized with
`nvfp4_ext.format`, output in the activation dtype. This module never imports Triton, so engines can run
these on CPU and tests can compare the kernels against them.
"""

from __future__ import annotations

from typing import Literal

import torch

from nvfp4_ext.format import dequantize_fp8, dequantize_nvfp4

__all__ = ["Activation", "apply_gated_activation", "fp8_gemm_ref", "nvfp4_gemm_ref", "nvfp4_moe_ref"]

Activation = Literal["gelu_tanh", "silu"]
ACTIVATIONS: tuple[str, ...] = ("gelu_tanh", "silu")


def apply_gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act(gate) * up in float32: `gelu_tanh` is tanh-approximated GELU (Gemma), `silu` is SwiGLU's."""
    gate = gate.float()
    if activation == "gelu_tanh":
        activated = torch.nn.functional.gelu(gate, approximate="tanh")
    elif activation == "silu":
        activated = torch.nn.functional.silu(gate)
    else:
        raise ValueError(f"expected activation in {ACTIVATIONS}, got {activation!r}")
    return activated * up.float()


def nvfp4_gemm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T (+ bias) for a weight-only NVFP4 linear layer.

    Args:
        x: [M, K] activations, any float dtype.
        weight: uint8 [N, K/2] packed E2M1 codes.
        weight_scale: float8_e4m3fn [N, K/16] block scales.
        global_scale: float32 multiplier (ModelOpt convention), 0-d or [N] (one per output row, so fused
            qkv/gate_up shards keep their own scale exactly).
        bias: optional [N].
    Returns:
        [M, N] in x.dtype, computed in float32.
    """
    w = dequantize_nvfp4(weight, weight_scale, global_scale)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def nvfp4_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_global: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Activation = "gelu_tanh",
) -> torch.Tensor:
    """Routed NVFP4 experts: out[t] = sum_j w[t,j] * W2[e] @ (act(G[e] @ x[t]) * (U[e] @ x[t])), e = ids[t,j].

    Only experts that received tokens are dequantized, one at a time, so peak memory is one expert's
    float32 weights rather than all E of them.

    Args:
        x: [T, H] activations.
        w13: uint8 [E, 2I, H/2]; rows [0, I) are the gate projection, rows [I, 2I) the up projection.
        w13_scale: float8_e4m3fn [E, 2I, H/16].
        w13_global: float32 multiplier, [E] or [E, 2I].
        w2: uint8 [E, H, I/2]; w2_scale: float8_e4m3fn [E, H, I/16]; w2_global: [E] or [E, H].
        topk_weights: float32 [T, k] router weights.
        topk_ids: int [T, k] expert ids.
        activation: "gelu_tanh" or "silu".
    Returns:
        [T, H] in x.dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"expected activation in {ACTIVATIONS}, got {activation!r}")
    num_tokens, hidden = x.shape
    intermediate = w13.shape[1] // 2
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    xf = x.float()
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1).float()
    flat_tokens = torch.arange(num_tokens, device=x.device).repeat_interleave(topk_ids.shape[1])
    for expert in torch.unique(flat_ids).tolist():
        selected = flat_ids == expert
        tokens = flat_tokens[selected]
        w13_e = dequantize_nvfp4(w13[expert], w13_scale[expert], w13_global[expert])
        gate_up = xf[tokens] @ w13_e.t()
        hidden_act = apply_gated_activation(gate_up[:, :intermediate], gate_up[:, intermediate:], activation)
        del w13_e
        w2_e = dequantize_nvfp4(w2[expert], w2_scale[expert], w2_global[expert])
        expert_out = (hidden_act @ w2_e.t()) * flat_weights[selected].unsqueeze(1)
        out.index_add_(0, tokens, expert_out)
    return out.to(x.dtype)


def fp8_gemm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T (+ bias) for a W8A16 FP8 linear layer.

    Args:
        x: [M, K] activations, any float dtype.
        weight: float8_e4m3fn [N, K].
        weight_scale: float32 0-d/[1] (per tensor), [N]/[N, 1] (per channel) or [ceil(N/128), ceil(K/128)]
            (128x128 blocks), as `nvfp4_ext.format.dequantize_fp8` reads it.
        bias: optional [N].
    Returns:
        [M, N] in x.dtype, computed in float32.
    """
    w = dequantize_fp8(weight, weight_scale)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
