"""NVFP4 weight quantization with a choice of block-scale rule: rtn, four-over-six or mse.

* `rtn` is NVIDIA ModelOpt's rule (block scale = block_amax / (6 * global), cast to e4m3) and produces bytes
  identical to `nvfp4_ext.format.quantize_nvfp4` (and hence to ModelOpt's `NVFP4QTensor.quantize`).
* `four-over-six` ("Four Over Six", arXiv 2512.02010) also tries scaling each block's max to 4 instead of 6
  (finer steps near the block max) and keeps whichever of the two scales gives the lower squared error.
* `mse` sweeps a window of e4m3 block-scale candidates around the RTN scale (plus the four-over-six one)
  per block, vectorized, and keeps the lowest squared error.

Ties always keep the RTN scale, so four-over-six and mse are never worse than rtn on any block, hence on
any tensor. The global scale is ModelOpt's amax/2688 for every rule (the per-tensor multiplier is not
searched).

Large tensors are processed in row chunks so the float32 temporaries stay small; block scales only depend
on their own row, so chunking changes nothing in the result.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from nvfp4_ext.format import (
    E2M1_VALUES,
    F4_E2M1_MAX,
    F8E4M3_MAX,
    NVFP4_BLOCK_SIZE,
    NVFP4_GLOBAL_DENOM,
    NVFP4Weight,
    nvfp4_block_scales,
    nvfp4_global_scale,
    pack_uint4,
)
from nvfp4_ext.quantize.options import SCALE_METHODS, ScaleMethod

__all__ = [
    "SCALE_METHODS",
    "NonFiniteWeightError",
    "ScaleMethod",
    "ScaleStats",
    "e2m1_codes",
    "e2m1_round",
    "quantize_weight",
]

# Elements per row chunk: keeps the float32 temporaries (~ a dozen of them) about cache-sized.
_CHUNK_ELEMENTS = 1 << 17
# mse: e4m3 code offsets tried around the RTN scale's code (8 codes per octave; +5 ~ the 6/4 scale).
_MSE_CODE_OFFSETS = (-3, -2, -1, 1, 2, 3, 4, 5, 6)
_E4M3_MAX_CODE = 126  # 0x7E = 448; 0x7F is NaN in float8_e4m3fn
_E2M1_TABLE = E2M1_VALUES.numpy()
# Byte -> its two decoded codes (low nibble first) as one 8-byte entry: a gather per byte, not per code.
_E2M1_PAIR_TABLE = np.stack([_E2M1_TABLE[np.arange(256) & 15], _E2M1_TABLE[np.arange(256) >> 4]], -1)
_E2M1_PAIR_TABLE = np.ascontiguousarray(_E2M1_PAIR_TABLE, dtype=np.float32).view(np.uint64).reshape(256)


class NonFiniteWeightError(ValueError):
    """The weight holds NaN or Inf values (found in its block maxima)."""


@dataclass
class ScaleStats:
    """Squared-error bookkeeping of one quantized tensor, to report what the scale rule gained over RTN.

    Attributes:
        sse: sum of squared errors of the chosen scales.
        sse_rtn: sum of squared errors RTN would have had.
        signal: sum of squared weights (for SQNR).
        blocks_changed: blocks whose scale differs from RTN.
        blocks: number of blocks.
    """

    sse: float = 0.0
    sse_rtn: float = 0.0
    signal: float = 0.0
    blocks_changed: int = 0
    blocks: int = 0

    def add(self, other: ScaleStats) -> None:
        self.sse += other.sse
        self.sse_rtn += other.sse_rtn
        self.signal += other.signal
        self.blocks_changed += other.blocks_changed
        self.blocks += other.blocks


# Magnitudes a value must exceed (strictly) or reach (the ties that round up, to the even code) per code step.
_STRICT_BOUNDS = (0.25, 1.25, 2.5, 5.0)
_TIE_UP_BOUNDS = (0.75, 1.75, 3.5)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of already-scaled float32 values; byte-identical to `format.cast_to_e2m1`.

    Seven SIMD comparisons in numpy (bool results added into the uint8 codes in place): on CPU several
    times faster than torch's searchsorted or a table gather, whose kernels are not vectorized. Inputs
    must be finite.
    """
    values = x.detach().contiguous().numpy()
    magnitude = np.abs(values)
    hit = np.empty(values.shape, dtype=np.bool_)
    codes = np.less(values, 0, out=hit).view(np.uint8) << 3  # -0.0 encodes as +0, as in ModelOpt
    for bound in _STRICT_BOUNDS:
        codes += np.greater(magnitude, bound, out=hit).view(np.uint8)
    for bound in _TIE_UP_BOUNDS:
        codes += np.greater_equal(magnitude, bound, out=hit).view(np.uint8)
    return torch.from_numpy(codes)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Signed float32 values of the E2M1 codes `e2m1_codes(x)` gives (quantize, then decode)."""
    return _decode(e2m1_codes(x))


def _decode(codes: torch.Tensor) -> torch.Tensor:
    # numpy's gather through the 16-entry table is vectorized; torch's (take / indexing) is not.
    return torch.from_numpy(np.take(_E2M1_TABLE, codes.numpy()))


def _quantize_blocks(
    blocks: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes of `blocks` [R, B, 16] under e4m3 `scale` [R, B], and the squared error per block.

    The division is the one `format.quantize_nvfp4` does (w / (scale * global) in float32), so the codes
    are ModelOpt's.
    """
    denom = (scale.float() * global_scale).unsqueeze(-1)
    codes = e2m1_codes(blocks / denom)
    sse = (blocks - _decode(codes) * denom).square().sum(-1)
    return codes, sse


def _block_sse(blocks: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Squared error per block of quantizing `blocks` [R, B, 16] with e4m3 `scale` [R, B]."""
    return _quantize_blocks(blocks, scale, global_scale)[1]


def _e4m3_from_codes(codes: torch.Tensor) -> torch.Tensor:
    return codes.clamp(1, _E4M3_MAX_CODE).to(torch.uint8).view(torch.float8_e4m3fn)


def _search_scales(
    blocks: torch.Tensor, rtn: torch.Tensor, global_scale: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick per-block scales for four-over-six / mse; returns (scale, sse, sse_rtn)."""
    sse_rtn = _block_sse(blocks, rtn, global_scale)
    best, best_sse = rtn, sse_rtn
    block_amax = blocks.abs().amax(-1)
    # Four-over-six: the block max lands on 4 (scale 6/4 larger than RTN's). Zero blocks keep RTN's 1.0.
    four = (block_amax / (4.0 * global_scale)).clamp(min=2.0**-9, max=448.0).to(torch.float8_e4m3fn)
    four = torch.where(block_amax == 0, rtn.view(torch.uint8), four.view(torch.uint8)).view(
        torch.float8_e4m3fn
    )
    candidates = [four]
    if method == "mse":
        rtn_codes = rtn.view(torch.uint8).to(torch.int16)
        candidates += [_e4m3_from_codes(rtn_codes + offset) for offset in _MSE_CODE_OFFSETS]
    for candidate in candidates:
        sse = _block_sse(blocks, candidate, global_scale)
        better = sse < best_sse  # strict: ties keep the earlier (RTN first) scale
        best = torch.where(better, candidate.view(torch.uint8), best.view(torch.uint8)).view(
            torch.float8_e4m3fn
        )
        best_sse = torch.where(better, sse, best_sse)
    return best, best_sse, sse_rtn


def _rtn_block_scales(chunk: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """`format.nvfp4_block_scales` of rows [R, K]: the same float32 operations, so the same bytes."""
    return _scales_from_amax(_block_amax(chunk), global_scale)


def _quantize_rows(
    chunk: torch.Tensor, method: str, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, ScaleStats]:
    """Quantize rows [R, K] (float32): packed codes, chosen e4m3 scales and their error bookkeeping."""
    rtn = _rtn_block_scales(chunk, global_scale)
    blocks = chunk.reshape(chunk.shape[0], -1, NVFP4_BLOCK_SIZE)
    if method == "rtn":
        chosen, sse_rtn = rtn, None
    else:
        chosen, _, sse_rtn = _search_scales(blocks, rtn, global_scale, method)
    codes, sse = _quantize_blocks(blocks, chosen, global_scale)
    changed = 0 if sse_rtn is None else int((chosen.view(torch.uint8) != rtn.view(torch.uint8)).sum())
    stats = ScaleStats(
        float(sse.sum()),
        float((sse if sse_rtn is None else sse_rtn).sum()),
        float(chunk.square().sum()),
        changed,
        rtn.numel(),
    )
    return pack_uint4(codes.reshape(chunk.shape)), chosen, stats


def _block_amax(rows: torch.Tensor) -> torch.Tensor:
    """|w| maxima of the 16-wide blocks of rows [R, K] as float32 [R, K/16], exactly `abs().amax(-1)`.

    For bf16/fp16/fp32 the maximum is taken over the sign-cleared bit patterns, which order like the
    magnitudes (NaN patterns above inf above every finite value, so NaN and inf still reach the global
    amax and are rejected there); an integer max over 16 lanes is ~3x cheaper on CPU than a float abs
    followed by a 16-wide float reduction.
    """
    if rows.dtype in _SIGN_CLEARED:
        int_dtype, mask = _SIGN_CLEARED[rows.dtype]
        bits = rows.contiguous().view(int_dtype) & mask
        return bits.view(-1, NVFP4_BLOCK_SIZE).amax(-1).view(rows.dtype).float().view(rows.shape[0], -1)
    return rows.float().abs().view(rows.shape[0], -1, NVFP4_BLOCK_SIZE).amax(-1)


_SIGN_CLEARED = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def _scales_from_amax(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """RTN e4m3 block scales from float32 block maxima, with `format.nvfp4_block_scales`' float32 ops."""
    scale = block_amax / (F4_E2M1_MAX * global_scale.float())
    scale = torch.where(block_amax == 0, torch.ones_like(scale), scale)
    return scale.clamp(min=2.0**-9, max=F8E4M3_MAX).to(torch.float8_e4m3fn)


def _pack_into(codes: torch.Tensor, out: torch.Tensor) -> None:
    """`pack_uint4(codes)` written into `out` (uint8 [R, K/2]): each little-endian uint16 holds a code pair
    (even k in its low byte), so one shift and one or over half as many lanes pack it, contiguously."""
    pairs = codes.numpy().reshape(-1).view(np.uint16)
    packed = np.right_shift(pairs, 4)
    np.bitwise_or(packed, pairs, out=packed)
    out.numpy().reshape(-1)[...] = packed  # the uint16 -> uint8 assignment keeps the low byte


def _rtn_rows(rows: torch.Tensor, denom: torch.Tensor, qdata: torch.Tensor) -> tuple[float, float]:
    """RTN-quantize rows [R, K] with block divisors `denom` [R, K/16] (e4m3 scale * global) into `qdata`
    [R, K/2]; returns (sse, signal).

    The same float32 division and rounding as `_quantize_blocks`, so the bytes are ModelOpt's; the
    squared error is summed with one dot product instead of per-block sums (rtn needs only the total).
    """
    values = rows.float().contiguous()
    blocks = values.view(rows.shape[0], -1, NVFP4_BLOCK_SIZE)
    denom = denom.unsqueeze(-1)
    _pack_into(e2m1_codes(blocks / denom), qdata)
    decoded = torch.from_numpy(np.take(_E2M1_PAIR_TABLE, qdata.numpy()).view(np.float32)).view(blocks.shape)
    error = torch.addcmul(blocks, decoded, denom, value=-1.0).view(-1)
    flat = values.view(-1)
    return float(torch.dot(error, error)), float(torch.dot(flat, flat))


def quantize_weight(
    w: torch.Tensor,
    method: ScaleMethod = "rtn",
    *,
    stats: ScaleStats | None = None,
    executor: Executor | None = None,
) -> NVFP4Weight:
    """Quantize a 2-D weight [N, K] (K a multiple of 16) to NVFP4 in ModelOpt convention.

    Two passes over row chunks: the 16-wide block maxima (whose maximum is the global amax), then codes
    and scales. Chunks keep the float32 temporaries cache-sized; block scales only depend on their own
    row, so chunking changes nothing in the result.

    Args:
        w: weight in any float dtype.
        method: block-scale rule, one of `SCALE_METHODS`.
        stats: if given, accumulates squared errors of the chosen and of the RTN scales.
        executor: runs row chunks in parallel (threads; torch and numpy release the GIL). Results do not
            depend on it.
    Returns:
        NVFP4Weight(qdata uint8 [N, K/2], scale e4m3 [N, K/16], global_scale f32 0-d = amax/2688).
    Raises:
        ValueError: unknown method, rank != 2, K not a multiple of 16, or NaN/Inf values.
    """
    if method not in SCALE_METHODS:
        raise ValueError(f"unknown scale method {method!r}; expected one of {', '.join(SCALE_METHODS)}")
    if w.dim() != 2 or w.shape[-1] % NVFP4_BLOCK_SIZE:
        raise ValueError(f"quantize_weight needs [N, K] with K a multiple of 16, got shape {tuple(w.shape)}")
    n, k = w.shape
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    starts = range(0, n, rows)
    run = executor.map if executor is not None else map

    block_amax = torch.empty(n, k // NVFP4_BLOCK_SIZE, dtype=torch.float32)

    def amax_pass(start: int) -> None:
        block_amax[start : start + rows] = _block_amax(w[start : start + rows])

    for _ in run(amax_pass, starts):
        pass
    amax = block_amax.max() if block_amax.numel() else torch.tensor(0.0)
    global_scale = amax / NVFP4_GLOBAL_DENOM  # = format.nvfp4_global_scale(w): the max of the block maxima
    if not torch.isfinite(global_scale):
        raise NonFiniteWeightError("the weight has non-finite values (NaN or Inf)")
    if global_scale == 0:  # all-zero weight: any scale encodes it; avoid ModelOpt's 0/0 NaN block scales
        global_scale = torch.tensor(1.0 / NVFP4_GLOBAL_DENOM)
    qdata = torch.empty(n, k // 2, dtype=torch.uint8)
    if method == "rtn":
        scale = _scales_from_amax(block_amax, global_scale)
        denom = scale.float() * global_scale

        def rtn(start: int) -> ScaleStats:
            end = min(start + rows, n)
            sse, signal = _rtn_rows(w[start:end], denom[start:end], qdata[start:end])
            return ScaleStats(sse, sse, signal, 0, (end - start) * (k // NVFP4_BLOCK_SIZE))

        for chunk_stats in run(rtn, starts):
            if stats is not None:
                stats.add(chunk_stats)
        return NVFP4Weight(qdata=qdata, scale=scale, global_scale=global_scale)

    scale = torch.empty(n, k // NVFP4_BLOCK_SIZE, dtype=torch.float8_e4m3fn)

    def work(start: int) -> tuple[torch.Tensor, torch.Tensor, ScaleStats]:
        return _quantize_rows(w[start : start + rows].float(), method, global_scale)

    for start, (packed, chosen, chunk_stats) in zip(starts, run(work, starts), strict=True):
        qdata[start : start + rows] = packed
        scale[start : start + rows] = chosen
        if stats is not None:
            stats.add(chunk_stats)
    return NVFP4Weight(qdata=qdata, scale=scale, global_scale=global_scale)
