"""Definitions shared by the denoise-statistics kernels and `nvfp4_ext.diffusion` (torch only, no Triton).

They live here, below both users, so the kernels never import the diffusion package:
  * `DenoiseStats`, the result of one step's statistics;
  * the counter-based Gumbel noise hash ("lowbias32" on 32 bits), which the torch path
    (`nvfp4_ext.diffusion.stats`) and the Triton kernel (`denoise_stats.py`) must compute bit for bit alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MASK32", "DenoiseStats", "mix32", "row_keys"]

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class DenoiseStats:
    """Statistics of one step for R rows (positions).

    Attributes:
        argmax: [R] int64, argmax of the tempered logits (the committed canvas).
        sample: [R] int64, a sample of softmax(z) (Gumbel-max with the given noise).
        entropy: [R] float32, entropy of softmax(z) in nats.
        top_prob: [R] float32, max of softmax(z).
        soft_embedding: [R, H] float32, softmax(z) @ E * embed_scale, or None when not requested.
    """

    argmax: torch.Tensor
    sample: torch.Tensor
    entropy: torch.Tensor
    top_prob: torch.Tensor
    soft_embedding: torch.Tensor | None = None


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash (bijective on 32 bits) of int64 tensors; only the low 32 bits are kept,
    which equals uint32 wrap-around arithmetic in the Triton kernel. In place after the first op (the
    torch path hashes [rows, chunk] int64 blocks)."""
    x = x & MASK32
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(MASK32)
    x ^= x >> 16
    return x


def row_keys(seed: int | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[R] int64 per-row noise keys mix32(mix32(seed) ^ row id); noise bit (r, c) = mix32(key_r ^ c).

    `seed` may be a 0-dim int64 tensor on the rows' device (no host round trip inside an engine step).
    """
    if isinstance(seed, torch.Tensor):
        seed_t = seed.to(device=rows.device, dtype=torch.int64).reshape(())
    else:
        seed_t = torch.tensor(seed & MASK32, dtype=torch.int64, device=rows.device)
    return mix32(mix32(seed_t) ^ rows.to(torch.int64))
