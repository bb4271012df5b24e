"""Token -> expert alignment for the grouped MoE GEMMs, in torch (no vLLM `_moe_C` op, no host sync).

Reference semantics: vLLM's `moe_align_block_size`. The T*k (token, slot) pairs of `topk_ids` are grouped
by expert, and each expert's list is padded to a multiple of `block_m`, so every M-block of the grouped GEMM
belongs to exactly one expert. Experts that received no token get no block, hence cost nothing.

CUDA-graph safe: every output's shape depends only on the input shapes, and nothing reads device values on
the host (`torch.bincount` would: on CUDA it syncs to size its output; a `scatter_add_` into a fixed [E + 1]
buffer does not). `tests/test_capture_safety.py` runs it under `FakeTensorMode`, where either would raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MoeAlignment", "moe_align_block_size"]


@dataclass(frozen=True, slots=True)
class MoeAlignment:
    """Where each M-block of the grouped GEMMs reads its rows.

    Attributes:
        sorted_ids: int32 [capacity]: flat pair ids t*k + j grouped by expert; padding holds `num_pairs`.
        expert_ids: int32 [capacity / block_m]: the expert of each M-block (-1 past the used blocks).
        num_padded: int32 [1]: used length of `sorted_ids` (a device tensor, so nothing syncs).
        num_pairs: T * k, the sentinel value.
        block_m: rows per M-block.
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    num_pairs: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        """Grid size along M: an upper bound on used blocks that depends only on shapes."""
        return self.expert_ids.numel()


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> MoeAlignment:
    """Group (token, slot) pairs by expert and pad each group to a multiple of `block_m`.

    The capacity is pairs + min(pairs, E) * (block_m - 1): at most min(pairs, E) experts are non-empty and
    each adds under one block of padding. A decode step (T=1, k=8) thus launches 8 M-blocks, not E.
    An id outside [0, E) (a broken router; the launcher refuses it in eager mode) lands in an overflow
    group that gets no block, so a captured graph never reads out of bounds.

    Args:
        topk_ids: int [T, k] expert ids, each in [0, num_experts).
        block_m: rows per M-block of the grouped GEMM.
        num_experts: E.
    Returns:
        A `MoeAlignment` on topk_ids' device.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    capacity = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    capacity = -(-capacity // block_m) * block_m
    in_range = (flat >= 0) & (flat < num_experts)
    group = torch.where(in_range, flat, num_experts)  # group E: the overflow group, never launched
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, group, torch.ones_like(group))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_counts[num_experts] = 0
    padded_ends = torch.cumsum(padded_counts, 0)
    padded_starts = padded_ends - padded_counts
    count_starts = torch.cumsum(counts, 0) - counts

    order = torch.argsort(group, stable=True)
    group_in_order = group[order]
    rank_in_group = torch.arange(num_pairs, device=device) - count_starts[group_in_order]
    # Overflow pairs are written to one extra slot past the capacity, which is then dropped.
    destination = torch.where(
        group_in_order < num_experts, padded_starts[group_in_order] + rank_in_group, capacity
    )
    sorted_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[destination] = order.to(torch.int32)
    sorted_ids = sorted_ids[:capacity]

    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends[:num_experts], block_starts, right=True)
    num_padded = padded_ends[num_experts:]  # [1]: the overflow group adds nothing
    expert_ids = torch.where(block_starts < num_padded, block_expert, -1).to(torch.int32)
    return MoeAlignment(
        sorted_ids=sorted_ids,
        expert_ids=expert_ids,
        num_padded=num_padded.to(torch.int32),
        num_pairs=num_pairs,
        block_m=block_m,
    )
