"""The NVFP4 and FP8 formats in pure torch: the reference every kernel and checkpoint path is checked against.

NVFP4 stores a weight W [..., N, K] as
  * `qdata`  uint8 [..., N, K/2]: E2M1 codes, two per byte along K, the even index in the low nibble;
  * `scale`  float8_e4m3fn [..., N, K/16]: one block scale per 16 consecutive K elements;
  * a float32 per-tensor global scale (per expert for 3-D expert tensors).
and W ~= e2m1(qdata) * scale * global_multiplier.

Two conventions store the global scale (see `GlobalScaleConvention`): ModelOpt keeps the *multiplier*
`weight_scale_2 = amax / 2688`, compressed-tensors keeps the *divisor* `weight_global_scale = 2688 / amax`.
The quantization math follows NVIDIA ModelOpt's `NVFP4QTensor` (byte-identical; tests use it as an oracle).
This module runs on any device and imports neither Triton nor an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "E2M1_BOUNDS",
    "E2M1_VALUES",
    "F4_E2M1_MAX",
    "F8E4M3_MAX",
    "FP8_BLOCK",
    "NVFP4_BLOCK_SIZE",
    "NVFP4_GLOBAL_DENOM",
    "Fp8Granularity",
    "GlobalScaleConvention",
    "NVFP4Weight",
    "cast_to_e2m1",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "e2m1_to_float",
    "fake_quantize_nvfp4",
    "global_multiplier",
    "nvfp4_block_scales",
    "nvfp4_global_scale",
    "nvfp4_linear",
    "pack_uint4",
    "quantize_fp8",
    "quantize_nvfp4",
    "stored_global_scale",
    "unpack_uint4",
]

NVFP4_BLOCK_SIZE = 16
F4_E2M1_MAX = 6.0
F8E4M3_MAX = 448.0
NVFP4_GLOBAL_DENOM = F4_E2M1_MAX * F8E4M3_MAX  # 2688: amax that maps to the largest code at the largest scale
FP8_BLOCK = (128, 128)
# Smallest positive e4m3 subnormal; ModelOpt clamps block scales into [2**-9, 448] before the cast.
_E4M3_MIN_SCALE = 2.0**-9

# Code c (0..15) -> value; bit 3 is the sign, bits 0-2 index the magnitude.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)
# Midpoints between consecutive magnitudes; at .75, 1.75 and 3.5 the tie rounds up (to the even code).
E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_ROUND_UP_TIES = torch.tensor([0.75, 1.75, 3.5])
_TABLES_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`table` on `device`, copied once per device: a host-to-device copy per call would be a sync per call
    and is not allowed while a CUDA graph is being captured."""
    key = (id(table), device)
    if key not in _TABLES_ON_DEVICE:
        _TABLES_ON_DEVICE[key] = table.to(device)
    return _TABLES_ON_DEVICE[key]

GlobalScaleConvention = Literal["modelopt", "compressed_tensors"]
Fp8Granularity = Literal["tensor", "channel", "block"]


# --------------------------------------------------------------------------------------------- E2M1 codes
def cast_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes with ModelOpt's rounding (saturating at +-6).

    Args:
        x: float tensor of any shape, values in units of the block scale.
    Returns:
        uint8 codes of the same shape (0..15; bit 3 = sign).
    """
    x = x.float()
    magnitude = x.abs()
    bounds = _on(E2M1_BOUNDS, x.device)
    ordinal = torch.searchsorted(bounds, magnitude, out_int32=True).to(torch.uint8)
    ties_up = (magnitude.unsqueeze(-1) == _on(_ROUND_UP_TIES, x.device)).any(-1).to(torch.uint8)
    sign = (x < 0).to(torch.uint8)  # -0.0 encodes as +0, as in ModelOpt
    return (sign << 3) + ordinal + ties_up


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode uint8 E2M1 codes (0..15) to float32 values (equal to `E2M1_VALUES[codes]`, -0.0 included).

    Arithmetic rather than a lookup in `E2M1_VALUES`: copying the table to a CUDA device on every call
    would be a host-to-device copy, which is illegal while a CUDA graph is being captured.
    """
    c = codes.to(torch.int32)
    exponent = (c >> 1) & 3
    half_mantissa = (c & 1).to(torch.float32) * 0.5
    magnitude = torch.where(
        exponent == 0, half_mantissa, torch.exp2((exponent - 1).to(torch.float32)) * (1.0 + half_mantissa)
    )
    return torch.where((c & 8) != 0, -magnitude, magnitude)


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., K] (K even) into bytes [..., K/2]; element 2i goes to the low nibble of byte i."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_uint4 needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes [..., K/2] into codes [..., K] (inverse of `pack_uint4`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_uint4 expects uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------------------ scales
def nvfp4_global_scale(w: torch.Tensor, *, per_leading_dim: bool | None = None) -> torch.Tensor:
    """ModelOpt's global multiplier amax / 2688, float32.

    Args:
        w: [N, K] weight, or [E, N, K] experts.
        per_leading_dim: one scale per expert (default for 3-D input) instead of one for the tensor.
    Returns:
        0-d tensor for 2-D input, [E] for 3-D input (unless per_leading_dim=False).
    """
    if per_leading_dim is None:
        per_leading_dim = w.dim() == 3
    if per_leading_dim:
        amax = w.abs().amax(dim=(-2, -1))
    else:
        amax = w.abs().amax()
    return amax.float() / NVFP4_GLOBAL_DENOM


def _check_k(w: torch.Tensor) -> None:
    if w.dim() < 2:
        raise ValueError(f"NVFP4 quantizes tensors of rank >= 2, got shape {tuple(w.shape)}")
    if w.shape[-1] % NVFP4_BLOCK_SIZE:
        raise ValueError(
            f"NVFP4 needs the last (K) dimension to be a multiple of {NVFP4_BLOCK_SIZE}, got shape "
            f"{tuple(w.shape)}"
        )


def _expand_global(global_scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """Broadcast a scalar or per-leading-dim global scale against [..., N, K/16] block tensors."""
    g = global_scale.float()
    return g.reshape(*g.shape, *([1] * (ndim - g.dim()))) if g.dim() else g


def nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-block e4m3 scales block_amax / (6 * global), zero blocks -> 1.0 (ModelOpt's rule).

    Args:
        w: [..., N, K] weight, K a multiple of 16.
        global_scale: multiplier, 0-d or one per leading index.
    Returns:
        float8_e4m3fn [..., N, K/16].
    """
    _check_k(w)
    blocks = w.reshape(*w.shape[:-1], -1, NVFP4_BLOCK_SIZE)
    block_amax = blocks.abs().amax(-1).float()
    scale = block_amax / (F4_E2M1_MAX * _expand_global(global_scale, block_amax.dim()))
    # Zero blocks get scale 1.0 (ModelOpt's rule); testing the amax, not the quotient, also covers an
    # all-zero tensor whose global scale is 0, where ModelOpt's 0/0 would store NaN scales.
    scale = torch.where(block_amax == 0, torch.ones_like(scale), scale)
    return scale.clamp(min=_E4M3_MIN_SCALE, max=F8E4M3_MAX).to(torch.float8_e4m3fn)


@dataclass(frozen=True)
class NVFP4Weight:
    """A quantized NVFP4 tensor in ModelOpt convention.

    Attributes:
        qdata: uint8 [..., N, K/2] packed E2M1 codes.
        scale: float8_e4m3fn [..., N, K/16] block scales.
        global_scale: float32 multiplier (0-d, or [E] for experts).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nvfp4(self.qdata, self.scale, self.global_scale, dtype=dtype)


def quantize_nvfp4(
    w: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    block_scale: torch.Tensor | None = None,
) -> NVFP4Weight:
    """Quantize with ModelOpt's math (byte-identical to `NVFP4QTensor.quantize`).

    Args:
        w: [N, K] or [E, N, K] weight in any float dtype; K a multiple of 16.
        global_scale: multiplier to use (default amax/2688, per expert for 3-D input).
        block_scale: precomputed e4m3 block scales (e.g. from an MSE search); default RTN.
    Returns:
        NVFP4Weight with qdata [..., N, K/2], scale [..., N, K/16], global_scale.
    Raises:
        ValueError: K not a multiple of 16, or rank < 2.
    """
    _check_k(w)
    if global_scale is None:
        global_scale = nvfp4_global_scale(w)
    global_scale = global_scale.float()
    if block_scale is None:
        block_scale = nvfp4_block_scales(w, global_scale)
    blocks = w.reshape(*w.shape[:-1], -1, NVFP4_BLOCK_SIZE)
    denom = block_scale.float() * _expand_global(global_scale, block_scale.dim())
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)  # all-zero tensor: codes 0, not NaN
    scaled = (blocks / denom.unsqueeze(-1)).reshape(w.shape)
    qdata = pack_uint4(cast_to_e2m1(scaled))
    return NVFP4Weight(qdata=qdata, scale=block_scale, global_scale=global_scale)


def global_multiplier(stored: torch.Tensor, convention: GlobalScaleConvention) -> torch.Tensor:
    """The dequantization multiplier from a stored global scale.

    ModelOpt stores it directly (`weight_scale_2`); compressed-tensors stores its reciprocal
    (`weight_global_scale` = 2688/amax), so it is inverted here in float64 and rounded once.
    """
    if convention == "modelopt":
        return stored.float()
    if convention == "compressed_tensors":
        return (1.0 / stored.double()).float()
    raise ValueError(f"unknown global scale convention {convention!r}")


def stored_global_scale(multiplier: torch.Tensor, convention: GlobalScaleConvention) -> torch.Tensor:
    """Inverse of `global_multiplier`: what a checkpoint of `convention` stores for `multiplier`."""
    if convention == "modelopt":
        return multiplier.float()
    if convention == "compressed_tensors":
        return (1.0 / multiplier.double()).float()
    raise ValueError(f"unknown global scale convention {convention!r}")


def dequantize_nvfp4(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    convention: GlobalScaleConvention = "modelopt",
) -> torch.Tensor:
    """e2m1(qdata) * scale * multiplier, computed in float32 then cast to `dtype`.

    Args:
        qdata: uint8 [..., N, K/2].
        scale: float8_e4m3fn [..., N, K/16] (any float dtype is accepted).
        global_scale: stored global scale in `convention`; 0-d, per leading index, or per row [..., N].
        dtype: output dtype.
        convention: how `global_scale` is stored.
    Returns:
        [..., N, K] tensor of `dtype`.
    """
    values = e2m1_to_float(unpack_uint4(qdata))
    values = values.reshape(*values.shape[:-1], -1, NVFP4_BLOCK_SIZE)
    multiplier = global_multiplier(global_scale, convention)
    block = scale.float() * _expand_global(multiplier, scale.dim())
    return (values * block.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations [..., K] as W4A4 kernels see them (dynamic block scales).

    Args:
        x: activations, K a multiple of 16.
        global_scale: the static `input_scale` multiplier; default from x's own amax.
    """
    flat = x.reshape(-1, x.shape[-1])
    q = quantize_nvfp4(flat, global_scale=global_scale)
    return q.dequantize(torch.float32).reshape(x.shape).to(x.dtype)


def nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference weight-only NVFP4 linear: x @ dequant(W).T (+ bias), float32 math, output in x.dtype.

    Args:
        x: [..., K] activations.
        weight: uint8 [N, K/2]; weight_scale: e4m3 [N, K/16]; weight_scale_2: multiplier, 0-d or [N].
        bias: optional [N].
    """
    w = dequantize_nvfp4(weight, weight_scale, weight_scale_2)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------- FP8
def quantize_fp8(
    w: torch.Tensor, granularity: Fp8Granularity = "tensor", block: tuple[int, int] = FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [N, K] to float8_e4m3fn with a float32 scale (W ~= q * scale).

    Returns:
        (q [N, K] e4m3, scale) where scale is 0-d ("tensor"), [N, 1] ("channel") or
        [ceil(N/bn), ceil(K/bk)] ("block").
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8 expects a 2-D weight, got shape {tuple(w.shape)}")
    wf = w.float()
    if granularity == "tensor":
        scale = wf.abs().amax() / F8E4M3_MAX
        expanded = scale
    elif granularity == "channel":
        scale = wf.abs().amax(dim=1, keepdim=True) / F8E4M3_MAX
        expanded = scale
    elif granularity == "block":
        bn, bk = block
        n, k = wf.shape
        padded = torch.nn.functional.pad(wf, (0, (-k) % bk, 0, (-n) % bn))
        tiles = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
        scale = tiles.abs().amax(dim=(1, 3)) / F8E4M3_MAX
        expanded = _expand_block_scale(scale, wf.shape, block)
    else:
        raise ValueError(f"unknown FP8 granularity {granularity!r}; expected tensor, channel or block")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    expanded = torch.where(expanded == 0, torch.ones_like(expanded), expanded)
    q = (wf / expanded).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.float()


def _expand_block_scale(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    bn, bk = block
    full = scale.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)
    return full[: shape[0], : shape[1]]


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize an FP8 weight; the scale's shape says its granularity (0-d/[1], [N]/[N,1], or blocks)."""
    qf = q.float()
    s = scale.float()
    n, k = q.shape
    if s.numel() == 1:
        out = qf * s.reshape(())
    elif s.dim() == 1 and s.shape[0] == n or s.dim() == 2 and tuple(s.shape) == (n, 1):
        out = qf * s.reshape(n, 1)
    elif s.dim() == 2 and tuple(s.shape) == (-(-n // block[0]), -(-k // block[1])):
        out = qf * _expand_block_scale(s, q.shape, block)
    else:
        raise ValueError(
            f"FP8 scale of shape {tuple(s.shape)} fits neither per-tensor, per-channel ({n}) nor "
            f"{block[0]}x{block[1]} blocks of a [{n}, {k}] weight"
        )
    return out.to(dtype)
