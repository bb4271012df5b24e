"""The NVFP4 layout our Triton kernels read: E2M1 codes bit-interleaved in 32-bit words, block scales
re-encoded so one integer multiply-add turns them into a bf16x2 operand (Marlin-style load-time repack).

Why: the kernels decode every weight on CUDA cores, and with the checkpoint's byte layout that costs 2.25
SASS instructions per weight (Hopper). Here a word holds 8 consecutive K-elements of a row whose bits are
scrambled by a fixed GF(2)-linear map, chosen so that each of the four bf16x2 operand registers is
`(rotl(q, a) ^ rotl(q, b)) & 0x81C081C0` (or `q & 0x81C081C0`): 4 rotations + 4 `lop3` + 4 `fma.bf16x2`
for 8 weights, 1.5 per weight (`WORD_DECODE_ASM`). No plain rotation layout exists: the bf16 bit mask
{6,7,8,15} does not tile Z/16, so each operand XORs two rotated copies, and the linear map is inverted at
load time (`pack_nvfp4_weights`).

Operand register k of a word holds its weights `WORD_PAIRS[k]` (low half, high half): registers 0-1 are the
even-K weights, 2-3 the odd-K ones, the split the kernels' two dots (`nvfp4_tile.load_nvfp4_tile_pair`) use.
A weight's operand bits: E2M1 sign -> bit 15, exponent/mantissa -> bits 8..6, i.e. bf16 bits of
e2m1 * 2**-126 (0.5 is a bf16 subnormal).

Block scales: a scale code byte c holds a positive e4m3 value normalized (subnormals included) as
2**((c >> 3) - 9) * (1 + (c & 7) / 8), so `c * 0x00100010 + 0x75807580` is that value * 2**117 in both bf16
halves, exactly; times an operand it gives e2m1 * scale * 2**-9 (bf16-exact: <= 6 significant bits, normal
range), made up by `MARLIN_GLOBAL_FACTOR` in the fp32 epilogue. Negative block scales move their sign into
the block's codes and zero scales zero their codes, both exact. Everything here is plain torch (no Triton):
adapters call `pack_nvfp4_weights` once at load on the layer's device.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "OPERAND_MASK",
    "SCALE_CODE_EXPONENT_BIAS",
    "SCALE_PAIR_BIAS",
    "SCALE_PAIR_MULTIPLIER",
    "WORD_DECODE_ASM",
    "WORD_OPERAND_SOURCES",
    "WORD_PAIRS",
    "check_packable",
    "is_packed",
    "pack_nvfp4_weights",
    "unpack_nvfp4_weights",
]

# Rotations (left, by bits) XORed into operand register k (0 = the word itself), and the weights of the
# 8-weight word it holds as (low half, high half). Found by search: no set of 3 rotations gives a bijection
# (each operand bit position then sees 4 source bits for 4 registers, which forces a tiling of Z/32 by the
# bf16 mask, and none exists).
WORD_OPERAND_SOURCES: tuple[tuple[int, ...], ...] = ((20, 30), (10, 30), (20, 8), (0,))
WORD_PAIRS: tuple[tuple[int, int], ...] = ((0, 2), (4, 6), (1, 3), (5, 7))
OPERAND_MASK = 0x81C081C0  # bf16x2: sign bits 15/31, e2m1 exponent+mantissa at bits 6-8 / 22-24
_OPERAND_BITS = (6, 7, 8, 15, 22, 23, 24, 31)  # operand bit of (low code bits 0..3, high code bits 0..3)

SCALE_PAIR_MULTIPLIER = 0x00100010  # code << 4 into both bf16 halves
SCALE_PAIR_BIAS = 0x75807580  # + 235 in both bf16 exponent fields: code value * 2**117
SCALE_CODE_EXPONENT_BIAS = 9  # code exponent field = log2 of the scale's power of two + 9

# One word -> the 8 bf16 operands (elementwise over int32 words, pack=1). Inputs: $8 = the word, $9 = its
# block's scale pair (`code * SCALE_PAIR_MULTIPLIER + SCALE_PAIR_BIAS`). Outputs $0..$7: the halves of operand
# registers 0..3 (low first), i.e. weights 0, 2, 4, 6, 1, 3, 5, 7 of the word, each e2m1 * scale * 2**-9.
# `lop3` 0x28 is (a ^ b) & c. tests/test_kernels_launchers.py executes this very string bit by bit.
WORD_DECODE_ASM = """
{
.reg .b32 rot20, rot30, rot10, rot8, operand, negzero;
mov.b32 negzero, 0x80008000;
shf.l.wrap.b32 rot20, $8, $8, 20;
shf.l.wrap.b32 rot30, $8, $8, 30;
shf.l.wrap.b32 rot10, $8, $8, 10;
shf.l.wrap.b32 rot8, $8, $8, 8;
lop3.b32 operand, rot20, rot30, 0x81C081C0, 0x28;
fma.rn.bf16x2 operand, operand, $9, negzero;
mov.b32 {$0, $1}, operand;
lop3.b32 operand, rot10, rot30, 0x81C081C0, 0x28;
fma.rn.bf16x2 operand, operand, $9, negzero;
mov.b32 {$2, $3}, operand;
lop3.b32 operand, rot20, rot8, 0x81C081C0, 0x28;
fma.rn.bf16x2 operand, operand, $9, negzero;
mov.b32 {$4, $5}, operand;
and.b32 operand, $8, 0x81C081C0;
fma.rn.bf16x2 operand, operand, $9, negzero;
mov.b32 {$6, $7}, operand;
}
"""


def _rotl_source_bit(bit: int, rotation: int) -> int:
    return (bit - rotation) % 32


@functools.cache
def _decode_columns() -> tuple[int, ...]:
    """Column j of the GF(2) map word -> T, where T's byte k holds the two codes of operand register k as
    (low code | high code << 4). Column j = the T bits that word bit j flips."""
    columns = [0] * 32
    for register, rotations in enumerate(WORD_OPERAND_SOURCES):
        for position, bit in enumerate(_OPERAND_BITS):
            for rotation in rotations:
                columns[_rotl_source_bit(bit, rotation)] ^= 1 << (8 * register + position)
    return tuple(columns)


@functools.cache
def _encode_columns() -> tuple[int, ...]:
    """Columns of the inverse map T -> word (Gauss-Jordan over GF(2)); raises if the map is singular."""
    decode = _decode_columns()
    # Row i of the decode matrix: which word bits feed T bit i.
    rows = [sum(((decode[j] >> i) & 1) << j for j in range(32)) for i in range(32)]
    inverse = [1 << i for i in range(32)]  # row operations applied to the identity
    for col in range(32):
        pivot = next((r for r in range(col, 32) if (rows[r] >> col) & 1), None)
        if pivot is None:
            raise AssertionError("WORD_OPERAND_SOURCES does not define a bijection")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        inverse[col], inverse[pivot] = inverse[pivot], inverse[col]
        for r in range(32):
            if r != col and (rows[r] >> col) & 1:
                rows[r] ^= rows[col]
                inverse[r] ^= inverse[col]
    # inverse[i] (row i of A^-1) says which T bits XOR into word bit i; turn rows into columns.
    return tuple(sum(((inverse[i] >> j) & 1) << i for i in range(32)) for j in range(32))


def _apply_columns(value: torch.Tensor, columns: tuple[int, ...]) -> torch.Tensor:
    """The GF(2) matrix with these columns applied to int64 tensors of 32-bit values."""
    out = torch.zeros_like(value)
    for j, column in enumerate(columns):
        out ^= ((value >> j) & 1) * column
    return out


def _words_of_bytes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4W] -> int64 [..., W] little-endian 32-bit values."""
    b = packed.reshape(*packed.shape[:-1], -1, 4).long()
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _bytes_of_words(words: torch.Tensor) -> torch.Tensor:
    """int64 [..., W] 32-bit values -> uint8 [..., 4W] (little-endian)."""
    parts = [((words >> (8 * i)) & 0xFF) for i in range(4)]
    return torch.stack(parts, dim=-1).reshape(*words.shape[:-1], -1).to(torch.uint8)


def _canonical_to_t(canonical: torch.Tensor) -> torch.Tensor:
    """Checkpoint bytes (byte j = code 2j | code 2j+1 << 4) of 8-weight words -> T (int64 per word)."""
    b = canonical.reshape(*canonical.shape[:-1], -1, 4).long()
    low = [b[..., i] & 0xF for i in range(4)]  # codes 0, 2, 4, 6
    high = [b[..., i] >> 4 for i in range(4)]  # codes 1, 3, 5, 7
    code = {2 * i: low[i] for i in range(4)} | {2 * i + 1: high[i] for i in range(4)}
    t = torch.zeros_like(low[0])
    for register, (lo, hi) in enumerate(WORD_PAIRS):
        t |= (code[lo] | (code[hi] << 4)) << (8 * register)
    return t


def _t_to_canonical(t: torch.Tensor) -> torch.Tensor:
    code = {}
    for register, (lo, hi) in enumerate(WORD_PAIRS):
        byte = (t >> (8 * register)) & 0xFF
        code[lo], code[hi] = byte & 0xF, byte >> 4
    parts = [code[2 * i] | (code[2 * i + 1] << 4) for i in range(4)]
    return torch.stack(parts, dim=-1).reshape(*t.shape[:-1], -1).to(torch.uint8)


def _scale_codes(magnitude: torch.Tensor) -> torch.Tensor:
    """e4m3 magnitude bytes (int64, 0..0x7E) -> scale codes; zero maps to 0 (its codes are zeroed).

    Arithmetic only (no lookup table: a table copied to the GPU would be a host-to-device copy, illegal
    while a CUDA graph is captured). A subnormal m * 2**-9 (m = 1..7) normalizes to exponent
    log2(m) - 9 and mantissa bits (m << (3 - log2 m)) & 7.
    """
    normal = magnitude + 16  # exponent field E -> E + 2 (= E - 7 + SCALE_CODE_EXPONENT_BIAS)
    log2_m = (magnitude >= 2).long() + (magnitude >= 4).long()
    subnormal = (log2_m << 3) | ((magnitude << (3 - log2_m)) & 7)
    return torch.where(magnitude >= 8, normal, subnormal)


def is_packed(weight: torch.Tensor) -> bool:
    """Whether a weight tensor is already in this layout (int32 words) rather than checkpoint bytes."""
    return weight.dtype == torch.int32


def check_packable(
    weight: torch.Tensor, weight_scale: torch.Tensor, name: str = "weight", *, check_values: bool = True
) -> None:
    """Raise ValueError naming `name` unless `pack_nvfp4_weights` accepts these tensors: uint8 codes
    [..., N, K/2] with K a positive multiple of 16, float8_e4m3fn scales [..., N, K/16], and (check_values,
    one host sync) no NaN scale, naming the first bad block."""
    half_k = weight.shape[-1] if weight.dim() else 0
    if (
        weight.dtype != torch.uint8
        or weight_scale.dtype != torch.float8_e4m3fn
        or half_k == 0
        or half_k % 8
        or tuple(weight_scale.shape) != (*weight.shape[:-1], half_k // 8)
    ):
        raise ValueError(
            f"{name}: expected uint8 codes [..., N, K/2] with K a positive multiple of 16 and float8_e4m3fn "
            f"scales [..., N, K/16], got {weight.dtype} {list(weight.shape)} / {weight_scale.dtype} "
            f"{list(weight_scale.shape)}"
        )
    if check_values:
        raw = weight_scale.contiguous().view(torch.uint8)
        nan = (raw & 0x7F) == 0x7F
        if bool(nan.any()):
            first = [int(i) for i in nan.nonzero()[0]]
            raise ValueError(
                f"{name}: block scale at index {first} is NaN (e4m3 byte 0x{int(raw[tuple(first)]):02X})"
            )


def pack_nvfp4_weights(
    weight: torch.Tensor, weight_scale: torch.Tensor, name: str = "weight", *, check_values: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint NVFP4 tensors -> the kernels' layout, exactly (same bytes of memory).

    Args:
        weight: uint8 [..., N, K/2] packed E2M1 (byte j = code 2j | code 2j+1 << 4); K a multiple of 16.
        weight_scale: float8_e4m3fn [..., N, K/16] block scales.
        name: the tensor named in errors.
        check_values: refuse NaN scales (one host sync); the launchers pass False while a CUDA graph is
            being captured, where a sync is illegal (adapters pack, and check, once at load).
    Returns:
        (int32 [..., N, K/8] words, uint8 [..., N, K/16] scale codes), contiguous, on weight's device.
    Raises:
        ValueError: wrong dtypes/shapes, or a NaN block scale (naming `name` and the first bad block).
    """
    check_packable(weight, weight_scale, name, check_values=check_values)
    half_k = weight.shape[-1]
    raw = weight_scale.contiguous().view(torch.uint8).long()
    rows = weight.contiguous().reshape(-1, half_k)
    raw_rows = raw.reshape(-1, half_k // 8)
    words = torch.empty((rows.shape[0], half_k // 4), dtype=torch.int32, device=weight.device)
    # Rows in chunks of ~4M bytes: the int64 temporaries stay ~32 MB each, whatever the layer's size (an
    # expert stack at load would otherwise need several GB on the GPU).
    step = max(1, (1 << 22) // half_k)
    for start in range(0, rows.shape[0], step):
        words[start : start + step] = _pack_rows(rows[start : start + step], raw_rows[start : start + step])
    codes = _scale_codes(raw & 0x7F).to(torch.uint8)
    return words.reshape(*weight.shape[:-1], half_k // 4), codes.contiguous()


def _pack_rows(rows: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, K/2] and their e4m3 scale bytes (int64 [R, K/16]) -> int32 words [R, K/8]."""
    blocks = rows.reshape(rows.shape[0], -1, 8).long()  # 8 bytes = one 16-weight block
    negative = ((raw & 0x80) != 0)[..., None]
    blocks = torch.where(negative, blocks ^ 0x88, blocks)  # the scale's sign moves into the codes
    blocks = torch.where(((raw & 0x7F) == 0)[..., None], torch.zeros_like(blocks), blocks)
    words = _apply_columns(_canonical_to_t(blocks.reshape(rows.shape)), _encode_columns())
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_nvfp4_weights(words: torch.Tensor, scale_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_nvfp4_weights` up to equivalent values: (uint8 codes [..., N, K/2], e4m3 scales
    [..., N, K/16]) whose dequantization equals the packed one exactly (signs and zeros moved as at packing).
    Used by the torch reference on packed weights and by tests."""
    t = _apply_columns(words.long() & 0xFFFFFFFF, _decode_columns())
    canonical = _t_to_canonical(t)
    codes = scale_codes.long()
    exponent = (codes >> 3) - SCALE_CODE_EXPONENT_BIAS
    value = torch.ldexp(1.0 + (codes & 7).double() / 8.0, exponent.double())
    return canonical, value.to(torch.float8_e4m3fn)
