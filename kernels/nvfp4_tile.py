"""Triton device functions shared by the NVFP4 kernels: E2M1/E4M3 decoding and loading a dequantized tile.

Reference for the decode: `nvfp4_ext.format.dequantize_nvfp4`. The kernels compute `W @ x^T` (weights as
the MMA's A operand: a 16-row decode tile still fills Hopper's 64-row wgmma, whose A operand then comes
straight from the decode registers). The tile loader returns W split into even-K and odd-K halves,
because packed byte j of a row holds K-elements 2j (low nibble) and 2j+1 (high nibble): pairing them
with the even and odd activation columns avoids interleaving nibbles in registers. Every operand value is e2m1 * e4m3 block scale, which has at most 6 significant bits and lies in
[2**-10, 2688], so it is exact in fp16 and bf16; global scales are applied to the fp32 accumulator.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ops import MARLIN_DECODE_CVT_SCALES

__all__ = [
    "E2M1_FP16_SCALE",
    "e2m1_pair_to_float",
    "e4m3_to_float",
    "E2M1_BF16X2_ASM",
    "E4M3_MARLIN_SCALE_ASM",
    "MARLIN_GLOBAL_FACTOR",
    "MARLIN_SCALE_FACTOR",
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


# Marlin-class decode: PTX over one 32-bit register of four packed bytes (eight E2M1 codes), bf16 operands.
# `prmt` pairs bytes 0-1 / 2-3 into the 16-bit halves of a register; per half, (c & 0xF) * 0x1040 & 0x81C0
# moves an E2M1 code's sign to bit 15 and its exponent/mantissa to bits 6-8 (bf16 bits of value * 2**-126,
# 0.5 a bf16 subnormal); one `fma.rn.bf16x2` by the block scale * 2**117 (`cvt` packs two per register)
# yields e2m1 * scale * 2**-9 for two weights at once, exactly (<= 6 significant bits). Callers fold 2**9
# into the global scale (MARLIN_GLOBAL_FACTOR). Inputs: $4 = 4 bytes, $5..$8 = fp32 scales of bytes 0..3.
# Outputs: $0/$1 = low-nibble values of bytes 0-1/2-3, $2/$3 = high-nibble values (elementwise, as
# `inline_asm_elementwise` requires). tests/test_kernels_launchers.py executes this very string bit by bit.
E2M1_BF16X2_ASM = """
{
.reg .b32 pair01, pair23, bits, scale01, scale23, negzero;
mov.b32 negzero, 0x80008000;
cvt.rn.bf16x2.f32 scale01, $6, $5;
cvt.rn.bf16x2.f32 scale23, $8, $7;
prmt.b32 pair01, $4, 0, 0x4140;
prmt.b32 pair23, $4, 0, 0x4342;
and.b32 bits, pair01, 0x000F000F;
mul.lo.u32 bits, bits, 0x1040;
and.b32 bits, bits, 0x81C081C0;
fma.rn.bf16x2 $0, bits, scale01, negzero;
and.b32 bits, pair23, 0x000F000F;
mul.lo.u32 bits, bits, 0x1040;
and.b32 bits, bits, 0x81C081C0;
fma.rn.bf16x2 $1, bits, scale23, negzero;
and.b32 bits, pair01, 0x00F000F0;
mul.lo.u32 bits, bits, 0x104;
and.b32 bits, bits, 0x81C081C0;
fma.rn.bf16x2 $2, bits, scale01, negzero;
and.b32 bits, pair23, 0x00F000F0;
mul.lo.u32 bits, bits, 0x104;
and.b32 bits, bits, 0x81C081C0;
fma.rn.bf16x2 $3, bits, scale23, negzero;
}
"""
_E2M1_BF16X2_ASM = tl.constexpr(E2M1_BF16X2_ASM)

# A block scale's e4m3 byte -> the fp32 operand E2M1_BF16X2_ASM expects (scale * 2**117, exact), with sm_89's
# native conversion: F2FP unpack + HADD2.F32 + FMUL in SASS, against 4 integer ops + those two on sm_80
# (`_e4m3_fp16_bits_to_float`). Input $1 = the byte (int32, 0..255), output $0 = fp32. The e4m3 value is
# exact in fp16 (subnormals included) and times 2**117 in fp32. tests/test_kernels_launchers.py executes
# this very string for every byte.
E4M3_MARLIN_SCALE_ASM = """
{
.reg .b16 byte, low, high;
.reg .b32 halves;
cvt.u16.u32 byte, $1;
cvt.rn.f16x2.e4m3x2 halves, byte;
mov.b32 {low, high}, halves;
cvt.f32.f16 $0, low;
mul.f32 $0, $0, 0f7A000000;
}
"""
_E4M3_MARLIN_SCALE_ASM = tl.constexpr(E4M3_MARLIN_SCALE_ASM)
_MARLIN_DECODE_CVT_SCALES = tl.constexpr(MARLIN_DECODE_CVT_SCALES)
MARLIN_SCALE_FACTOR = 2.0**117  # block scales enter the PTX as e4m3 * 2**117 (exact in bf16)
MARLIN_GLOBAL_FACTOR = 512.0  # 2**9: the PTX's values are e2m1 * scale * 2**-9
_MARLIN_SCALE_FROM_FP16 = tl.constexpr(256.0 * MARLIN_SCALE_FACTOR)  # e4m3_to_float's 2**8, folded in
_MARLIN_GLOBAL_FACTOR = tl.constexpr(MARLIN_GLOBAL_FACTOR)


@triton.jit
def marlin_global(row_global, MARLIN_DECODE: tl.constexpr):
    """The global scale a tile decoded by `load_nvfp4_tile_pair(MARLIN_DECODE=...)` needs: the PTX decode
    leaves values 2**-9 too small, made up here once per output column instead of a scaled copy per call."""
    if MARLIN_DECODE:
        row_global = row_global * _MARLIN_GLOBAL_FACTOR
    return row_global


@triton.jit
def _e4m3_fp16_bits_to_float(raw):
    """e4m3 bytes -> float32 value * 2**-8 (fp16 bit placement as in `e4m3_to_float`, one multiply saved)."""
    raw = raw.to(tl.int32)
    bits = ((raw & 0x7F) << 7) | ((raw & 0x80) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


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
def load_nvfp4_tile_pair(
    w_ptr, scale_ptr, offs_n, mask_n, k0, k_end, stride_wn, stride_sn,
    BLOCK_N: tl.constexpr, HALF_K: tl.constexpr, DOT_DTYPE: tl.constexpr, MARLIN_DECODE: tl.constexpr = 0,
):
    """Dequantized W for K-columns [k0, k0 + 2*HALF_K) of rows `offs_n`: (even-K, odd-K) [BLOCK_N, HALF_K],
    the A operand of `W @ x^T` (weights on the MMA's M side, so a 16-row decode tile still fills it).

    `w_ptr` / `scale_ptr` point at one weight matrix (uint8 [N, K/2] and e4m3-as-uint8 [N, K/16]); k0 is a
    multiple of 2*HALF_K (split-K boundaries are), so the packed bytes and scales load as wide vectors.
    Values carry the block scale but not the global scale. MARLIN_DECODE (`ops.marlin_decode_mode`: bf16
    operands on a GPU; the interpreter cannot run PTX) decodes with `E2M1_BF16X2_ASM`, its scales with
    `E4M3_MARLIN_SCALE_ASM` on sm_89+, and returns values 2**-9 too small, which the caller's global scale
    makes up; otherwise (0) the portable decode returns exact values.
    """
    k0 = tl.multiple_of(k0, 2 * HALF_K)
    bytes_k = k0 // 2 + tl.arange(0, HALF_K)
    mask_w = mask_n[:, None] & (bytes_k[None, :] < k_end // 2)
    packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + bytes_k[None, :], mask=mask_w, other=0)
    # The block scale of every packed byte, gathered at the bytes' own shape (8 bytes repeat one address,
    # and one mask per block, so the compiler loads and decodes it once per block): broadcasting a
    # [BLOCK_N, K/16] tile instead leaves a register layout that costs ~60 byte shuffles per K step around
    # the decode in the MoE down tile (sm_90a, 6.1 -> 5.3 SASS per weight).
    blocks_k = k0 // 16 + tl.arange(0, HALF_K) // 8
    mask_s = mask_n[:, None] & (blocks_k[None, :] < k_end // 16)
    raw_scale = tl.load(scale_ptr + offs_n[:, None] * stride_sn + blocks_k[None, :], mask=mask_s, other=0)
    if MARLIN_DECODE:
        tl.static_assert(tl.bfloat16 == DOT_DTYPE, "the PTX decode produces bf16 operands")
        if MARLIN_DECODE == _MARLIN_DECODE_CVT_SCALES:
            scale = tl.inline_asm_elementwise(
                _E4M3_MARLIN_SCALE_ASM, "=r,r", [raw_scale.to(tl.int32)], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            scale = _e4m3_fp16_bits_to_float(raw_scale) * _MARLIN_SCALE_FROM_FP16
        w_low, w_high = tl.inline_asm_elementwise(
            _E2M1_BF16X2_ASM, "=r,=r,=r,=r,r,r,r,r,r", [packed, scale],
            dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
        )
    else:
        # The scale also carries the decode's 2**14.
        block_scale = e4m3_to_float(raw_scale) * _E2M1_FP16_SCALE
        w_low, w_high = e2m1_pair_to_float(packed.to(tl.int32))
        w_low = (w_low * block_scale).to(DOT_DTYPE)
        w_high = (w_high * block_scale).to(DOT_DTYPE)
    return w_low, w_high
