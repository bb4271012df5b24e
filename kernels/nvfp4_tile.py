"""Triton device functions shared by the NVFP4 kernels: E2M1/E4M3 decoding and loading a dequantized tile.

Reference for the decode: `nvfp4_ext.format.dequantize_nvfp4` (weights in the `nvfp4_words` layout are
first unpacked by `nvfp4_words.unpack_nvfp4_weights`). The kernels compute `W @ x^T` (weights as the MMA's
A operand: a 16-row decode tile still fills Hopper's 64-row wgmma). The tile loader returns W split into
even-K and odd-K halves, the two dots per K step, because a word's operand registers pair weights (0, 2),
(4, 6) and (1, 3), (5, 7): each register then lands whole in one half. Every operand value is
e2m1 * e4m3 block scale (times 2**-9 in the PTX decode), which has at most 6 significant bits and lies in
bf16's normal range, so it is exact in fp16 and bf16; global scales are applied to the fp32 accumulator.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .nvfp4_words import (
    OPERAND_MASK,
    SCALE_CODE_EXPONENT_BIAS,
    SCALE_PAIR_BIAS,
    SCALE_PAIR_MULTIPLIER,
    WORD_DECODE_ASM,
)

__all__ = [
    "E2M1_FP16_SCALE",
    "e2m1_pair_to_float",
    "e4m3_to_float",
    "MARLIN_GLOBAL_FACTOR",
    "load_activation_pair_t",
    "load_nvfp4_tile_pair",
    "marlin_global",
    "row_offsets",
]


# fp16 bits of an E2M1 code c: sign (bit 3) to bit 15, exponent and mantissa (bits 0-2) to bits 9-11. That
# reads as e2m1(c) * 2**-14 (e2m1's 0.5 lands on fp16's subnormal 2**-15); callers fold 2**14 into the scale.
E2M1_FP16_SCALE = 16384.0
_E2M1_FP16_SCALE = tl.constexpr(E2M1_FP16_SCALE)  # jit code may only read constexpr globals


@triton.jit
def e2m1_pair_to_float(packed):
    """Packed bytes (int32, 0..255) -> (low-nibble, high-nibble) E2M1 values * 2**-14 as float32.

    Five integer ops and one fp16->fp32 conversion per value, against about a dozen for an arithmetic
    decode with selects (counted in the sm_90 SASS of the decode tile: 1444 -> 759 instructions per K step).
    """
    low_bits = ((packed & 0x7) << 9) | ((packed & 0x8) << 12)
    high_bits = ((packed & 0x70) << 5) | ((packed & 0x80) << 8)
    low = low_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = high_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def e4m3_to_float(raw):
    """float8_e4m3fn bytes (loaded as uint8: sm_80 has no e4m3 type) -> float32, subnormals included.

    Shifting the 7 magnitude bits left by 7 lands them in fp16's exponent/mantissa fields, which gives the
    e4m3 value * 2**-8 (fp16 subnormals cover e4m3's); the sign moves from bit 7 to bit 15.
    """
    raw = raw.to(tl.int32)
    bits = ((raw & 0x7F) << 7) | ((raw & 0x80) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def row_offsets(rows, stride):
    """Element offsets rows * stride in int64: in int32 they wrap once M * N reaches 2**31 (a 262144-wide
    LM head at 8192 tokens), and the kernel would read or write the wrong rows."""
    return rows.to(tl.int64) * stride


# The PTX decode leaves values 2**-9 too small (`nvfp4_words`): made up in the fp32 epilogue.
MARLIN_GLOBAL_FACTOR = 512.0
_MARLIN_GLOBAL_FACTOR = tl.constexpr(MARLIN_GLOBAL_FACTOR)
_WORD_DECODE_ASM = tl.constexpr(WORD_DECODE_ASM)
_SCALE_PAIR_MULTIPLIER = tl.constexpr(SCALE_PAIR_MULTIPLIER)
_SCALE_PAIR_BIAS = tl.constexpr(SCALE_PAIR_BIAS)
# fp32 bits of a scale code's value: (code + (127 - 9) << 3) << 20 puts its exponent field and 3-bit mantissa
# in place; times 2**14, the portable E2M1 decode's factor.
_SCALE_CODE_FP32_OFFSET = tl.constexpr((127 - SCALE_CODE_EXPONENT_BIAS) << 3)
_OPERAND_MASK = tl.constexpr(OPERAND_MASK)


@triton.jit
def marlin_global(row_global, MARLIN_DECODE: tl.constexpr):
    """The global scale a tile decoded by `load_nvfp4_tile_pair(MARLIN_DECODE=...)` needs: the PTX decode
    leaves values 2**-9 too small, made up here once per output column instead of a scaled copy per call."""
    if MARLIN_DECODE:
        row_global = row_global * _MARLIN_GLOBAL_FACTOR
    return row_global


@triton.jit
def load_activation_pair_t(row_ptrs, mask_rows, k0, k_end, HALF_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Activation columns k0 + 2j and k0 + 2j + 1 (j < HALF_K) of the rows at `row_ptrs` [BLOCK_M, 1], as
    the transposed pair (even, odd) [HALF_K, BLOCK_M]: the B operand of `W @ x^T`.

    One contiguous, vectorized [BLOCK_M, 2*HALF_K] load split in registers (strided even/odd loads cost ~60
    scalar-load instructions per K step in the decode tile). Values are upcast to fp32 right after the load
    (the interpreter computes bf16 wrongly). k_end is even, so a column pair is fully in range or out.
    """
    BLOCK_M: tl.constexpr = row_ptrs.shape[0]
    cols = k0 + tl.arange(0, 2 * HALF_K)
    x = tl.load(row_ptrs + cols[None, :], mask=mask_rows & (cols[None, :] < k_end), other=0.0)
    x = x.to(tl.float32).to(DOT_DTYPE)
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF_K, 2)))
    return tl.trans(x_even), tl.trans(x_odd)


@triton.jit
def _rotl(word, bits: tl.constexpr):
    if bits == 0:
        return word
    return (word << bits) | (word >> (32 - bits))


@triton.jit
def _operand_codes(operand):
    """A bf16x2 operand register's two E2M1 codes as one checkpoint-style byte (low | high << 4)."""
    low = ((operand >> 6) & 0x7) | ((operand >> 12) & 0x8)
    high = ((operand >> 22) & 0x7) | ((operand >> 28) & 0x8)
    return (low | (high << 4)).to(tl.int32)


@triton.jit
def _scaled_codes(byte, block_scale, DOT_DTYPE: tl.constexpr):
    """A checkpoint-style byte's two E2M1 codes times the block scale (which carries the decode's 2**14)."""
    low, high = e2m1_pair_to_float(byte)
    return (low * block_scale).to(DOT_DTYPE), (high * block_scale).to(DOT_DTYPE)


@triton.jit
def _interleave4(a, b, c, d, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr):
    """[BLOCK_N, W] x 4 -> [BLOCK_N, 4W] with a, b, c, d as elements 4w .. 4w + 3 (tl.join's new dimension
    is the minor one, so the outer join pairs (a, c) with (b, d))."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (BLOCK_N, HALF_K))


@triton.jit
def load_nvfp4_tile_pair(
    w_ptr, scale_ptr, offs_n, mask_n, k0, k_end, stride_wn, stride_sn,
    BLOCK_N: tl.constexpr, HALF_K: tl.constexpr, DOT_DTYPE: tl.constexpr, MARLIN_DECODE: tl.constexpr = 0,
):
    """Dequantized W for K-columns [k0, k0 + 2*HALF_K) of rows `offs_n`: (even-K, odd-K) [BLOCK_N, HALF_K],
    the A operand of `W @ x^T` (weights on the MMA's M side, so a 16-row decode tile still fills it).

    `w_ptr` / `scale_ptr` point at one weight matrix in `nvfp4_words` layout (int32 words [N, K/8], uint8
    scale codes [N, K/16]; `stride_wn` counts words); k0 is a multiple of 2*HALF_K (split-K boundaries
    are). Values carry the block scale but not the global scale. MARLIN_DECODE (`ops.marlin_decode_mode`:
    bf16 operands on a GPU; the interpreter cannot run PTX) decodes with `WORD_DECODE_ASM` and returns
    values 2**-9 too small, which the caller's global scale makes up (`marlin_global`); otherwise (0) the
    portable decode recovers each operand's codes with integer ops and returns exact values.
    """
    WORDS: tl.constexpr = HALF_K // 4
    k0 = tl.multiple_of(k0, 2 * HALF_K)
    words_k = k0 // 8 + tl.arange(0, WORDS)
    mask_w = mask_n[:, None] & (words_k[None, :] < k_end // 8)
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + words_k[None, :], mask=mask_w, other=0)
    # Each word's block scale gathered at the words' shape (two words share an address, which the compiler
    # loads once): broadcasting a [BLOCK_N, K/16] tile instead costs register shuffles around the decode.
    blocks_k = k0 // 16 + tl.arange(0, WORDS) // 2
    mask_s = mask_n[:, None] & (blocks_k[None, :] < k_end // 16)
    codes = tl.load(scale_ptr + offs_n[:, None] * stride_sn + blocks_k[None, :], mask=mask_s, other=0)
    codes = codes.to(tl.int32)
    if MARLIN_DECODE:
        tl.static_assert(tl.bfloat16 == DOT_DTYPE, "the PTX decode produces bf16 operands")
        scale_pair = codes * _SCALE_PAIR_MULTIPLIER + _SCALE_PAIR_BIAS
        w0, w2, w4, w6, w1, w3, w5, w7 = tl.inline_asm_elementwise(
            _WORD_DECODE_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, scale_pair],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1,
        )
    else:
        # Same operand registers as the PTX (WORD_OPERAND_SOURCES), their codes decoded like checkpoint bytes.
        q = words.to(tl.uint32, bitcast=True)
        mask = _OPERAND_MASK
        pairs = (
            _operand_codes((_rotl(q, 20) ^ _rotl(q, 30)) & mask),
            _operand_codes((_rotl(q, 10) ^ _rotl(q, 30)) & mask),
            _operand_codes((_rotl(q, 20) ^ _rotl(q, 8)) & mask),
            _operand_codes(q & mask),
        )
        # The scale code's value as fp32 bits, times the E2M1 decode's 2**14.
        block_scale = ((codes + _SCALE_CODE_FP32_OFFSET) << 20).to(tl.float32, bitcast=True) * _E2M1_FP16_SCALE
        w0, w2 = _scaled_codes(pairs[0], block_scale, DOT_DTYPE)
        w4, w6 = _scaled_codes(pairs[1], block_scale, DOT_DTYPE)
        w1, w3 = _scaled_codes(pairs[2], block_scale, DOT_DTYPE)
        w5, w7 = _scaled_codes(pairs[3], block_scale, DOT_DTYPE)
    w_even = _interleave4(w0, w2, w4, w6, BLOCK_N, HALF_K)
    w_odd = _interleave4(w1, w3, w5, w7, BLOCK_N, HALF_K)
    return w_even, w_odd
