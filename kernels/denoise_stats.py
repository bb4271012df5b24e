"""Triton kernels for DiffusionGemma's fused unembedding + denoise statistics (reference:
`nvfp4_ext.diffusion.stats.fused_denoise_stats`, backend "torch").

Two launches per step and no other device work: the noise keys are hashed in the kernel from a device
seed and the row ids, the temperatures and the soft-embedding scale are read from device tensors, and the
outputs (argmax, sample, entropy, top probability, soft embedding) are written directly, so the launcher
makes no host round trip and can be captured in a CUDA graph.

Two passes over the vocabulary, neither materializing [rows, vocab]:
  1. `_denoise_stats_kernel` (grid: row blocks): logits = softcap(h E^T) / T per [BLOCK_R, BLOCK_V] tile,
     online max / sum -> argmax, Gumbel-max sample (counter hash of (seed, row, vocab id), the same bits as
     the torch path), entropy, top probability, and the row max / exp-sum for pass 2;
  2. `_soft_embedding_kernel` (grid: row blocks x hidden blocks): softmax(z) @ E * embed_scale, recomputing
     the logits tile with pass 1's max / sum, so the accumulator is [BLOCK_R, BLOCK_HO] in registers.
Accumulation is fp32; operands are upcast right after loading when `DOT_FP32` (fp32 inputs, and always
under TRITON_INTERPRET=1, whose bf16 arithmetic is wrong). With bf16 operands on GPU the logits are not
rounded to bf16 before the softcap as HF's lm_head output is (differences at bf16 rounding level).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .denoise_common import MASK32, DenoiseStats

__all__ = ["DEFAULT_BLOCKS", "denoise_stats_triton", "kernel_variants"]

# (BLOCK_R, BLOCK_V, BLOCK_H, BLOCK_HO, num_warps): rows per program, vocab tile, reduction tile over H,
# soft-embedding output tile. tl.dot needs every tile dim >= 16.
DEFAULT_BLOCKS = (16, 64, 64, 64, 4)


@triton.jit
def _hash32(x):
    # lowbias32 on uint32 (wrap-around multiply), identical to denoise_common.mix32 on the low 32 bits.
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _tempered_logits(
    h_ptr,
    e_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    inv_t,
    H,
    stride_hm,
    stride_ev,
    cap,
    HAS_CAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        e = tl.load(
            e_ptr + cols[None, :] * stride_ev + ks[:, None],
            mask=col_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        if DOT_FP32:
            h = h.to(tl.float32)
            e = e.to(tl.float32)
        acc += tl.dot(h, e)
    if HAS_CAP:  # cap * tanh(x / cap), with tanh(y) = 1 - 2 / (exp(2y) + 1)
        acc = cap * (1.0 - 2.0 / (tl.exp(2.0 * acc / cap) + 1.0))
    return acc * inv_t[:, None]


@triton.jit
def _denoise_stats_kernel(
    # pointers
    h_ptr,
    e_ptr,
    temp_ptr,
    seed_ptr,
    row_id_ptr,
    argmax_ptr,
    sample_ptr,
    entropy_ptr,
    top_ptr,
    max_ptr,
    sum_ptr,
    # shapes and strides
    M,
    V,
    H,
    stride_hm,
    stride_ev,
    cap,
    # meta
    HAS_CAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    inv_t = 1.0 / tl.load(temp_ptr + rows, mask=row_mask, other=1.0)
    seed_key = _hash32(tl.load(seed_ptr).to(tl.uint32))
    row_key = _hash32(seed_key ^ tl.load(row_id_ptr + rows, mask=row_mask, other=0).to(tl.uint32))
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    noisy_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    run_arg = tl.zeros((BLOCK_R,), dtype=tl.int32)
    noisy_arg = tl.zeros((BLOCK_R,), dtype=tl.int32)
    exp_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    centered = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _tempered_logits(
            h_ptr,
            e_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            inv_t,
            H,
            stride_hm,
            stride_ev,
            cap,
            HAS_CAP,
            DOT_FP32,
            BLOCK_R,
            BLOCK_V,
            BLOCK_H,
        )
        z = tl.where(col_mask[None, :], z, float("-inf"))
        bits = _hash32(row_key[:, None] ^ cols[None, :].to(tl.uint32))
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        noisy = z - tl.log(-tl.log(u))
        chunk_noisy = tl.max(noisy, axis=1)
        chunk_noisy_arg = tl.argmax(noisy, axis=1) + v0
        better = chunk_noisy > noisy_max
        noisy_max = tl.where(better, chunk_noisy, noisy_max)
        noisy_arg = tl.where(better, chunk_noisy_arg, noisy_arg)
        chunk_max = tl.max(z, axis=1)
        chunk_arg = tl.argmax(z, axis=1) + v0
        better = chunk_max > run_max
        new_max = tl.where(better, chunk_max, run_max)
        run_arg = tl.where(better, chunk_arg, run_arg)
        seen = run_max > float("-inf")
        shift = tl.where(seen, run_max - new_max, 0.0)
        alpha = tl.where(seen, tl.exp(shift), 0.0)
        d = tl.where(col_mask[None, :], z - new_max[:, None], 0.0)  # masked columns: no -inf * 0
        w = tl.where(col_mask[None, :], tl.exp(d), 0.0)
        centered = alpha * (centered + shift * exp_sum) + tl.sum(w * d, axis=1)
        exp_sum = alpha * exp_sum + tl.sum(w, axis=1)
        run_max = new_max
    tl.store(argmax_ptr + rows, run_arg.to(tl.int64), mask=row_mask)
    tl.store(sample_ptr + rows, noisy_arg.to(tl.int64), mask=row_mask)
    tl.store(entropy_ptr + rows, tl.log(exp_sum) - centered / exp_sum, mask=row_mask)
    tl.store(top_ptr + rows, 1.0 / exp_sum, mask=row_mask)
    tl.store(max_ptr + rows, run_max, mask=row_mask)
    tl.store(sum_ptr + rows, exp_sum, mask=row_mask)


@triton.jit
def _soft_embedding_kernel(
    # pointers
    h_ptr,
    e_ptr,
    temp_ptr,
    max_ptr,
    sum_ptr,
    scale_ptr,
    out_ptr,
    # shapes and strides
    M,
    V,
    H,
    stride_hm,
    stride_ev,
    stride_om,
    cap,
    # meta
    HAS_CAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HO: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    outs = tl.program_id(1) * BLOCK_HO + tl.arange(0, BLOCK_HO)
    out_mask = outs < H
    inv_t = 1.0 / tl.load(temp_ptr + rows, mask=row_mask, other=1.0)
    row_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_HO), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _tempered_logits(
            h_ptr,
            e_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            inv_t,
            H,
            stride_hm,
            stride_ev,
            cap,
            HAS_CAP,
            DOT_FP32,
            BLOCK_R,
            BLOCK_V,
            BLOCK_H,
        )
        w = tl.where(col_mask[None, :], tl.exp(z - row_max[:, None]), 0.0)
        e = tl.load(
            e_ptr + cols[:, None] * stride_ev + outs[None, :],
            mask=col_mask[:, None] & out_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(w, e)
    scale = tl.load(scale_ptr).to(tl.float32) / tl.load(sum_ptr + rows, mask=row_mask, other=1.0)
    tl.store(
        out_ptr + rows[:, None] * stride_om + outs[None, :],
        acc * scale[:, None],
        mask=row_mask[:, None] & out_mask[None, :],
    )


def denoise_stats_triton(
    hidden: torch.Tensor,
    embed_weight: torch.Tensor,
    temps: torch.Tensor,
    *,
    seed: int | torch.Tensor,
    row_ids: torch.Tensor,
    cap: float | None,
    embed_scale: float | torch.Tensor | None,
    blocks: tuple[int, int, int, int, int] = DEFAULT_BLOCKS,
) -> DenoiseStats:
    """Launch the two kernels; same contract as `fused_denoise_stats` (which validates the shapes).

    Args:
        hidden: [M, H] fp32/fp16/bf16, last dim contiguous; embed_weight: [V, H] same dtype, contiguous rows.
        temps: [M] float32; row_ids: [M] int64; blocks: (BLOCK_R, BLOCK_V, BLOCK_H, BLOCK_HO, num_warps).
        seed, embed_scale: ints/floats or 0-dim device tensors (tensors: no host round trip, the form an
            engine step uses; a Python number costs one small host-to-device copy).
    """
    if hidden.dtype != embed_weight.dtype or hidden.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        raise ValueError(
            f"expected hidden and embed_weight in one of fp32/fp16/bf16, got {hidden.dtype} and "
            f"{embed_weight.dtype}"
        )
    if hidden.stride(-1) != 1 or embed_weight.stride(-1) != 1:
        raise ValueError("expected hidden and embed_weight with a contiguous last dimension")
    block_r, block_v, block_h, block_ho, num_warps = blocks
    rows, hidden_size = hidden.shape
    vocab, device = embed_weight.shape[0], hidden.device
    seed_t = _device_scalar(seed, torch.int64, device, lambda v: v & MASK32)
    row_ids = _as_contiguous(row_ids, torch.int64)
    temps = _as_contiguous(temps, torch.float32)
    argmax = torch.empty(rows, dtype=torch.int64, device=device)
    sample = torch.empty_like(argmax)
    entropy, top_prob = (torch.empty(rows, dtype=torch.float32, device=device) for _ in range(2))
    row_max, exp_sum = torch.empty_like(entropy), torch.empty_like(entropy)
    soft = None
    if embed_scale is not None:
        soft = torch.empty(rows, hidden_size, dtype=torch.float32, device=device)
    if rows == 0:
        return DenoiseStats(argmax, sample, entropy, top_prob, soft)
    dot_fp32 = hidden.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    common = dict(
        HAS_CAP=cap is not None,
        DOT_FP32=dot_fp32,
        BLOCK_R=block_r,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    grid_rows = triton.cdiv(rows, block_r)
    _denoise_stats_kernel[(grid_rows,)](
        hidden,
        embed_weight,
        temps,
        seed_t,
        row_ids,
        argmax,
        sample,
        entropy,
        top_prob,
        row_max,
        exp_sum,
        rows,
        vocab,
        hidden_size,
        hidden.stride(0),
        embed_weight.stride(0),
        float(cap or 1.0),
        **common,
    )
    if soft is not None:
        scale_t = _device_scalar(embed_scale, torch.float32, device, float)
        _soft_embedding_kernel[(grid_rows, triton.cdiv(hidden_size, block_ho))](
            hidden,
            embed_weight,
            temps,
            row_max,
            exp_sum,
            scale_t,
            soft,
            rows,
            vocab,
            hidden_size,
            hidden.stride(0),
            embed_weight.stride(0),
            soft.stride(0),
            float(cap or 1.0),
            BLOCK_HO=block_ho,
            **common,
        )
    return DenoiseStats(argmax, sample, entropy, top_prob, soft)


def _as_contiguous(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # No copy (no launch) when the caller already hands the right dtype and layout.
    return tensor if tensor.dtype == dtype and tensor.is_contiguous() else tensor.to(dtype).contiguous()


def _device_scalar(value, dtype: torch.dtype, device: torch.device, convert) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(()) if value.dtype == dtype else value.reshape(()).to(dtype)
    return torch.tensor(convert(value), dtype=dtype, device=device)


def kernel_variants(dtype: str = "bf16", blocks: tuple[int, int, int, int, int] = DEFAULT_BLOCKS) -> list:
    """The two kernels as `nvfp4_ext.kernels.report.KernelVariant`s for ahead-of-time compilation."""
    from .report import KernelVariant

    block_r, block_v, block_h, block_ho, num_warps = blocks
    meta = {
        "HAS_CAP": True,
        "DOT_FP32": dtype == "fp32",
        "BLOCK_R": block_r,
        "BLOCK_V": block_v,
        "BLOCK_H": block_h,
    }
    sizes = {"M": "i32", "V": "i32", "H": "i32", "stride_hm": "i32", "stride_ev": "i32"}
    stats_sig = {
        "h_ptr": f"*{dtype}",
        "e_ptr": f"*{dtype}",
        "temp_ptr": "*fp32",
        "seed_ptr": "*i64",
        "row_id_ptr": "*i64",
        "argmax_ptr": "*i64",
        "sample_ptr": "*i64",
        "entropy_ptr": "*fp32",
        "top_ptr": "*fp32",
        "max_ptr": "*fp32",
        "sum_ptr": "*fp32",
        **sizes,
        "cap": "fp32",
        **{k: "constexpr" for k in meta},
    }
    soft_meta = {**meta, "BLOCK_HO": block_ho}
    soft_sig = {
        "h_ptr": f"*{dtype}",
        "e_ptr": f"*{dtype}",
        "temp_ptr": "*fp32",
        "max_ptr": "*fp32",
        "sum_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "out_ptr": "*fp32",
        **sizes,
        "stride_om": "i32",
        "cap": "fp32",
        **{k: "constexpr" for k in soft_meta},
    }
    label = f"{block_r}x{block_v}x{block_h} w{num_warps} {dtype}"
    return [
        KernelVariant("denoise_stats", label, _denoise_stats_kernel, stats_sig, meta, num_warps, 1),
        KernelVariant(
            "denoise_soft_embedding",
            f"{label} ho{block_ho}",
            _soft_embedding_kernel,
            soft_sig,
            soft_meta,
            num_warps,
            1,
        ),
    ]
