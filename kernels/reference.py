"""Pure-torch references of every kernel in `nvfp4_ext.kernels` (also the CPU path).

Each function here defines what its Triton kernel must compute: float32 math on weights dequantized with
`nvfp4_ext.format`, output in the activation dtype. This module never imports Triton, so engines can run
these on CPU and tests can compare the kernels against them.
"""

from __future__ import annotations

from typing import Literal

import torch

from nvfp4_ext.format import dequantize_fp8, dequantize_nvfp4

from .nvfp4_words import is_packed, unpack_nvfp4_weights

__all__ = ["Activation", "apply_gated_activation", "fp8_gemm_ref", "nvfp4_gemm_ref", "nvfp4_moe_ref"]

Activation = Literal["gelu_tanh", "silu"]
ACTIVATIONS: tuple[str, ...] = ("gelu_tanh", "silu")


def _checkpoint_layout(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights the adapters packed for our kernels (`nvfp4_words`) back to checkpoint bytes; others as is."""
    if is_packed(weight):
        return unpack_nvfp4_weights(weight, scale)
    return weight, scale


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
        weight: uint8 [N, K/2] packed E2M1 codes (or int32 [N, K/8] `nvfp4_words`, with uint8 scale codes).
        weight_scale: float8_e4m3fn [N, K/16] block scales.
        global_scale: float32 multiplier (ModelOpt convention), 0-d or [N] (one per output row, so fused
            qkv/gate_up shards keep their own scale exactly).
        bias: optional [N].
    Returns:
        [M, N] in x.dtype, computed in float32.
    """
    w = dequantize_nvfp4(*_checkpoint_layout(weight, weight_scale), global_scale)
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

    CUDA-graph safe (this is also the CUDA path below sm_80): no host read of `topk_ids`, no shape that
    depends on its values. Experts are dequantized one at a time, so peak memory is one expert's float32
    weights. Decode-sized inputs (T*k <= E pairs) run each pair through its own expert; larger ones run every
    expert over all tokens, weighted by the router (zero where the token did not pick it).

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
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    xf = x.float()
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1).float()

    def expert_mlp(rows: torch.Tensor, expert: int | torch.Tensor) -> torch.Tensor:
        # `expert` is a python int or a 1-element device tensor (index_select keeps the host out).
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[expert] if isinstance(expert, int) else t.index_select(0, expert)[0]

        w13_e = dequantize_nvfp4(*_checkpoint_layout(pick(w13), pick(w13_scale)), pick(w13_global))
        gate_up = rows @ w13_e.t()
        del w13_e
        intermediate = gate_up.shape[1] // 2
        act = apply_gated_activation(gate_up[:, :intermediate], gate_up[:, intermediate:], activation)
        return act @ dequantize_nvfp4(*_checkpoint_layout(pick(w2), pick(w2_scale)), pick(w2_global)).t()

    if flat_ids.numel() <= num_experts:
        for pair in range(flat_ids.numel()):
            token = pair // top_k
            contribution = expert_mlp(xf[token : token + 1], flat_ids[pair : pair + 1])
            out[token : token + 1] += contribution * flat_weights[pair]
    else:
        for expert in range(num_experts):
            picked = flat_ids == expert
            weight = torch.where(picked, flat_weights, 0.0).reshape(num_tokens, top_k).sum(1, keepdim=True)
            contribution = expert_mlp(xf, expert)
            # where, not a product: a token that skipped this expert contributes exactly nothing (not NaN).
            routed = picked.reshape(num_tokens, top_k).any(1, keepdim=True)
            out += torch.where(routed, contribution * weight, 0.0)
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
