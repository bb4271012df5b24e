"""Tolerances for float results that are sums of many terms.

Two fp32 computations of the same sums in different orders (another kernel, thread count, machine, or a
tensor-parallel split into partial sums) differ by a few units in the last place of the *summed terms'
magnitude*, not of the result: an output near zero made of large terms of both signs can move by far more
than any fixed absolute tolerance. So the bound is `ulps * eps(fp32) * sum(|term|)`, computed in fp64.
A real error (a wrong shard, scale or route) is of the order of the result itself, thousands of times larger.
"""

from __future__ import annotations

import torch

__all__ = ["assert_within_rounding", "linear_terms", "moe_terms"]


def assert_within_rounding(
    actual: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor, ulps: float = 8
) -> None:
    """Assert |actual - expected| <= ulps * eps32 * terms elementwise (terms: sum of |term| per element)."""
    assert actual.shape == expected.shape == terms.shape, (actual.shape, expected.shape, terms.shape)
    difference = (actual.double() - expected.double()).abs()
    bound = ulps * torch.finfo(torch.float32).eps * terms.double()
    worst = int((difference - bound).flatten().argmax())
    assert (difference <= bound).all(), (
        f"element {worst}: off by {difference.flatten()[worst]:.3g}, "
        f"rounding bound {bound.flatten()[worst]:.3g}"
    )


def linear_terms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_k |x[t, k]| |W[n, k]| for y = x @ W^T."""
    return x.double().abs() @ weight.double().abs().t()


def moe_terms(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Magnitude of the terms of a routed gated MoE (w13 [E, 2I, H] = gate over up, w2 [E, H, I]), with
    |act(v)| <= |v| for silu and gelu; routes with a negative expert id contribute nothing."""
    x, w13, w2 = x.double().abs(), w13.double().abs(), w2.double().abs()
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e < 0:
                continue
            gate_up = w13[e] @ x[t]
            out[t] += abs(float(topk_weights[t, j])) * (w2[e] @ (gate_up[:inter] * gate_up[inter:]))
    return out
