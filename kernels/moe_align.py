"""Token -> expert alignment for the grouped MoE GEMMs, in torch (no vLLM `_moe_C` op, no host sync).

Reference semantics: vLLM's `moe_align_block_size`. The T*k (token, slot) pairs of `topk_ids` are grouped
by expert, and each expert's list is padded to a multiple of `block_m`, so every M-block of the grouped GEMM
belongs to exactly one expert. Experts that received no token get no block, hence cost nothing.
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
    counts = torch.bincount(flat, minlength=num_experts)
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0)
    padded_starts = padded_ends - padded_counts
    count_starts = torch.cumsum(counts, 0) - counts

    order = torch.argsort(flat, stable=True)
    experts_in_order = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - count_starts[experts_in_order]
    destination = padded_starts[experts_in_order] + rank_in_expert
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[destination] = order.to(torch.int32)

    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    num_padded = padded_ends[-1:] if num_experts else torch.zeros(1, dtype=torch.int64, device=device)
    expert_ids = torch.where(block_starts < num_padded, block_expert, -1).to(torch.int32)
    return MoeAlignment(
        sorted_ids=sorted_ids,
        expert_ids=expert_ids,
        num_padded=num_padded.to(torch.int32),
        num_pairs=num_pairs,
        block_m=block_m,
    )
