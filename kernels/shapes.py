"""DiffusionGemma (TP=1) shapes the shipped kernel configs are tuned and AOT-checked for (no Triton import).

Attention: 16 query heads, 8 sliding / 2 global KV heads, head dim 256 (sliding) / 512 (global layers have
K = V, so no v_proj); dense MLP 2112; 128 routed experts of 704, top-8; hidden 2816; vocab 262144.
"""

from __future__ import annotations

__all__ = ["DIFFUSIONGEMMA_GEMM_SHAPES", "DIFFUSIONGEMMA_MOE_SHAPE"]

# (name, N, K) of each linear layer.
DIFFUSIONGEMMA_GEMM_SHAPES: tuple[tuple[str, int, int], ...] = (
    ("qkv_sliding", 16 * 256 + 2 * 8 * 256, 2816),
    ("qk_global", 16 * 512 + 2 * 512, 2816),
    ("o_sliding", 2816, 16 * 256),
    ("o_global", 2816, 16 * 512),
    ("mlp_gate_up", 2 * 2112, 2816),
    ("mlp_down", 2816, 2112),
    ("lm_head", 262144, 2816),
)

DIFFUSIONGEMMA_MOE_SHAPE: dict[str, int] = {
    "num_experts": 128,
    "hidden": 2816,
    "intermediate": 704,
    "top_k": 8,
}
