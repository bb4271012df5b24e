"""Launcher input checks, config selection and token alignment (CPU; no kernel is launched)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="covered without the interpreter; keeps that run lean"
)
pytest.importorskip("triton")

from nvfp4_ext.kernels.fp8_gemm_kernel import fp8_gemm_triton  # noqa: E402
from nvfp4_ext.kernels.moe_align import moe_align_block_size  # noqa: E402
from nvfp4_ext.kernels.nvfp4_gemm_kernel import GemmConfig, nvfp4_gemm_triton, select_gemm_config  # noqa: E402
from nvfp4_ext.kernels.nvfp4_moe_kernel import nvfp4_moe_triton, select_moe_config  # noqa: E402

from nvfp4_ext.format import quantize_fp8, quantize_nvfp4  # noqa: E402


@pytest.fixture(scope="module")
def linear():
    q = quantize_nvfp4(torch.randn(48, 64))
    return torch.randn(2, 64, dtype=torch.float16), q


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda x, q: (x.float().double(), q.qdata, q.scale, q.global_scale),
            "expected x as a 2-D fp16/bf16/fp32",
        ),
        (lambda x, q: (x[:, :48], q.qdata, q.scale, q.global_scale), r"expected weight uint8 \[N, 24\]"),
        (lambda x, q: (x, q.qdata.view(torch.int8), q.scale, q.global_scale), "expected weight uint8"),
        (lambda x, q: (x, q.qdata, q.scale.float(), q.global_scale), "expected weight_scale float8_e4m3fn"),
        (lambda x, q: (x, q.qdata, q.scale[:, :2], q.global_scale), r"expected weight_scale .*\[48, 4\]"),
        (lambda x, q: (x, q.qdata, q.scale, torch.ones(3)), r"expected global_scale 0-d or \[48\]"),
        (lambda x, q: (x.t().contiguous().t(), q.qdata, q.scale, q.global_scale), "unit stride along K"),
        (lambda x, q: (x[:, :40], q.qdata[:, :20], q.scale, q.global_scale), "multiple of 16"),
    ],
)
def test_nvfp4_gemm_launcher_rejects_bad_inputs(linear, mutate, message):
    x, q = linear
    with pytest.raises(ValueError, match=message):
        nvfp4_gemm_triton(*mutate(x, q))


def test_nvfp4_gemm_launcher_rejects_bad_bias_and_config(linear):
    x, q = linear
    with pytest.raises(ValueError, match=r"expected bias \[48\]"):
        nvfp4_gemm_triton(x, q.qdata, q.scale, q.global_scale, torch.zeros(47))
    with pytest.raises(ValueError, match="expected block_n to be a power of two >= 16, got 48"):
        GemmConfig(16, 48, 64)
    with pytest.raises(ValueError, match="expected split_k >= 1"):
        GemmConfig(16, 64, 64, split_k=0)


def test_fp8_launcher_rejects_bad_scales():
    w, _ = quantize_fp8(torch.randn(48, 64))
    with pytest.raises(ValueError, match=r"expected weight_scale 0-d, \[48\], \[48, 1\] or \[1, 1\]"):
        fp8_gemm_triton(torch.randn(2, 64), w, torch.ones(3, 3))
    with pytest.raises(ValueError, match="expected weight contiguous float8_e4m3fn"):
        fp8_gemm_triton(torch.randn(2, 64), w.float(), torch.ones(()))


def _moe_args(topk_ids, experts=4, hidden=32, inter=16):
    q13 = quantize_nvfp4(torch.randn(experts, 2 * inter, hidden))
    q2 = quantize_nvfp4(torch.randn(experts, hidden, inter))
    x = torch.randn(topk_ids.shape[0], hidden, dtype=torch.float16)
    weights = torch.ones(topk_ids.shape, dtype=torch.float32)
    return [x, q13.qdata, q13.scale, q13.global_scale, q2.qdata, q2.scale, q2.global_scale, weights, topk_ids]


def test_moe_launcher_rejects_bad_inputs():
    args = _moe_args(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match=r"expected topk_ids in \[0, 4\), got values in \[0, 4\]"):
        nvfp4_moe_triton(*args)
    args = _moe_args(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="expected activation in"):
        nvfp4_moe_triton(*args, activation="relu")
    bad = list(args)
    bad[4] = args[4][:, :, :4]
    with pytest.raises(ValueError, match=r"expected w2 contiguous uint8 \[4, 32, 8\]"):
        nvfp4_moe_triton(*bad)
    bad = list(args)
    bad[3] = torch.ones(4, 3)
    with pytest.raises(ValueError, match=r"expected w13_global \[4\] or \[4, 32\]"):
        nvfp4_moe_triton(*bad)
    bad = list(args)
    bad[7] = torch.ones(1, 3)
    with pytest.raises(ValueError, match=r"expected topk_weights \[1, 2\]"):
        nvfp4_moe_triton(*bad)


def test_moe_alignment_groups_pairs_by_expert_and_skips_empty_experts():
    topk_ids = torch.tensor([[3, 1], [3, 3], [1, 6], [3, 0]])
    align = moe_align_block_size(topk_ids, block_m=4, num_experts=8)
    pairs = topk_ids.numel()
    num_padded = int(align.num_padded)
    # Experts 0 (1 pair), 1 (2), 3 (4), 6 (1): one block each; experts 2, 4, 5, 7 get none.
    assert num_padded == 4 * 4
    assert align.expert_ids[:4].tolist() == [0, 1, 3, 6]
    assert (align.expert_ids[4:] == -1).all()
    flat = topk_ids.reshape(-1)
    for block, expert in enumerate(align.expert_ids[:4].tolist()):
        ids = align.sorted_ids[block * 4 : (block + 1) * 4]
        real = ids[ids < pairs]
        assert (flat[real.long()] == expert).all()
        assert sorted(real.tolist()) == sorted((flat == expert).nonzero().flatten().tolist())
    assert (align.sorted_ids[num_padded:] == pairs).all()
    # Capacity depends only on shapes: pairs + min(pairs, E) * (block_m - 1), rounded to blocks.
    assert align.sorted_ids.numel() == 8 + 8 * 3


def test_moe_alignment_of_one_decode_token_launches_top_k_blocks():
    align = moe_align_block_size(torch.arange(8).reshape(1, 8) * 16, block_m=16, num_experts=128)
    assert align.max_blocks == 8 and int(align.num_padded) == 8 * 16


def test_config_selection_buckets():
    assert select_gemm_config(1, 2816, 2816).block_m == 16
    assert select_gemm_config(1, 2816, 2816).split_k > 1  # 44 tiles alone would leave SMs idle
    assert select_gemm_config(1, 262144, 2816).split_k == 1  # the LM head has tiles to spare
    assert select_gemm_config(2048, 2816, 2816).block_m == 128
    assert select_moe_config(1, 128, 8).block_m == 16
    assert select_moe_config(2048, 128, 8).block_m == 64


def _bf16_to_float(half: torch.Tensor) -> torch.Tensor:
    """16-bit patterns (int64, 0..0xFFFF) -> their bf16 values as float64 (subnormals included)."""
    return ((half + 0x8000) % 0x10000 - 0x8000).to(torch.int16).view(torch.bfloat16).double()


def _float_to_bf16_bits(value: torch.Tensor) -> torch.Tensor:
    """Round to bf16 (round-to-nearest-even, as `.rn`) and return the 16-bit pattern as int64."""
    return value.float().to(torch.bfloat16).view(torch.int16).long() & 0xFFFF


class _PtxMachine:
    """Executes the straight-line b32 PTX of `nvfp4_words.WORD_DECODE_ASM` on int64 tensors (one lane per
    element).

    Only the opcodes the shipped string uses are known; anything else fails the test, so an edit to the PTX
    cannot silently escape this model. Semantics from the PTX ISA: `shf.l.wrap.b32 d, a, b, c` (the upper
    32 bits of {b, a} << (c mod 32)), `lop3.b32 d, a, b, c, lut` (bit i of d = bit (a_i << 2 | b_i << 1 |
    c_i)... of lut, with a, b, c weighted 0xF0, 0xCC, 0xAA), `and.b32`, `mov.b32` (also `{lo, hi}` unpack)
    and `fma.rn.bf16x2` (per half, one rounding of the exact a * b + c, subnormals kept).
    """

    def __init__(self, operands: dict[str, torch.Tensor]) -> None:
        self.registers = dict(operands)

    def value(self, token: str) -> torch.Tensor:
        token = token.strip()
        if token in self.registers:
            return self.registers[token]
        return torch.tensor(int(token, 0), dtype=torch.int64)

    def run(self, asm: str) -> None:
        import re

        for line in asm.splitlines():
            line = line.strip().rstrip(";")
            if not line or line in "{}" or line.startswith(".reg"):
                continue
            opcode, rest = line.split(None, 1)
            unpack = re.fullmatch(r"\{\s*([$\w]+)\s*,\s*([$\w]+)\s*\}\s*,\s*(\S+)", rest)
            if opcode == "mov.b32" and unpack:
                source = self.value(unpack.group(3))
                self.registers[unpack.group(1)] = source & 0xFFFF
                self.registers[unpack.group(2)] = (source >> 16) & 0xFFFF
                continue
            args = [a.strip() for a in rest.split(",")]
            dest, sources = args[0], [self.value(a) for a in args[1:]]
            if opcode == "mov.b32":
                result = sources[0] & 0xFFFFFFFF
            elif opcode == "and.b32":
                result = sources[0] & sources[1]
            elif opcode == "shf.l.wrap.b32":
                low, high, shift = torch.broadcast_tensors(*sources)
                funnel = ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF)
                result = ((funnel << (shift % 32)) >> 32) & 0xFFFFFFFF
            elif opcode == "lop3.b32":
                a, b, c, lut = torch.broadcast_tensors(*sources)
                result = torch.zeros_like(a)
                for bit in range(32):
                    index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                    result |= ((lut >> index) & 1) << bit
            elif opcode == "fma.rn.bf16x2":
                halves = []
                for shift in (0, 16):
                    a, b, c = (_bf16_to_float((s >> shift) & 0xFFFF) for s in sources)
                    halves.append(_float_to_bf16_bits(a * b + c) << shift)  # fp64: a * b + c is exact
                result = halves[0] | halves[1]
            else:
                raise AssertionError(f"the PTX model does not know {opcode!r}: extend it with the new code")
            assert re.fullmatch(r"\$?\w+", dest), dest
            self.registers[dest] = result


def _every_code_in_every_slot_with_every_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint bytes uint8 [R, 8] (one 16-weight block per row) and e4m3 scales [R, 1]: each of the 16
    codes in each of the 16 positions under each of the 254 finite scale bytes (signs, subnormals, zero,
    448), the other positions random."""
    gen = torch.Generator().manual_seed(0)
    scale_bytes = torch.arange(256)
    scale_bytes = scale_bytes[(scale_bytes & 0x7F) != 0x7F]
    codes = torch.randint(0, 16, (len(scale_bytes), 16, 16, 16), generator=gen)  # [scale, code, slot, 16]
    for slot in range(16):
        codes[:, :, slot, slot] = torch.arange(16)
    codes = codes.reshape(-1, 16)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    scales = scale_bytes.repeat_interleave(16 * 16).to(torch.uint8).view(torch.float8_e4m3fn)[:, None]
    return packed, scales


def test_word_decode_ptx_reproduces_e2m1_times_scale_for_every_code_slot_and_scale():
    """Packs checkpoint bytes with `pack_nvfp4_weights`, runs the shipped `WORD_DECODE_ASM` text (its
    rotations, LUTs and operand order, not a copy) through a PTX model with the scale operand the kernel
    computes from the scale code, and compares every output with ModelOpt's E2M1 table times torch's e4m3
    decoding of the original scale: every code in every position of a word, every finite scale byte
    (negative and zero scales included, which packing moves into the codes). Whether the GPU executes PTX as
    the ISA says is for `pytest -m gpu tests/test_kernels_gpu.py`."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import e2m1_values

    from nvfp4_ext.kernels.nvfp4_tile import MARLIN_GLOBAL_FACTOR
    from nvfp4_ext.kernels.nvfp4_words import (
        SCALE_PAIR_BIAS,
        SCALE_PAIR_MULTIPLIER,
        WORD_DECODE_ASM,
        pack_nvfp4_weights,
    )

    packed, scales = _every_code_in_every_slot_with_every_scale()
    words, codes = pack_nvfp4_weights(packed, scales)
    assert words.shape == (packed.shape[0], 2) and codes.shape == scales.shape
    expected = e2m1_values.double()[torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1, 16).long()]
    expected = expected * scales.double()
    scale_pair = codes.long() * SCALE_PAIR_MULTIPLIER + SCALE_PAIR_BIAS
    for half in range(2):  # the block's two words
        machine = _PtxMachine({"$8": words[:, half].long() & 0xFFFFFFFF, "$9": scale_pair[:, 0]})
        machine.run(WORD_DECODE_ASM)
        for output, weight in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            got = _bf16_to_float(machine.registers[f"${output}"]) * MARLIN_GLOBAL_FACTOR
            assert torch.equal(got, expected[:, 8 * half + weight]), (half, output)


def test_packing_round_trips_and_names_a_nan_scale():
    """`unpack_nvfp4_weights(pack_nvfp4_weights(...))` dequantizes (ModelOpt's NVFP4 dequantization) to
    exactly the original values; a NaN block scale is refused naming the tensor and the block."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from nvfp4_ext.kernels.nvfp4_words import pack_nvfp4_weights, unpack_nvfp4_weights

    packed, scales = _every_code_in_every_slot_with_every_scale()
    packed, scales = packed.reshape(-1, 16), scales.reshape(-1, 2)  # two blocks per row, K = 32
    words, codes = pack_nvfp4_weights(packed, scales)
    back, back_scales = unpack_nvfp4_weights(words, codes)

    def dequantize(qdata, scale):
        tensor = NVFP4QTensor(torch.Size((qdata.shape[0], 2 * qdata.shape[1])), torch.float32, qdata)
        return tensor.dequantize(torch.float32, scale=scale, double_scale=torch.tensor(1.0), block_sizes={-1: 16})

    assert torch.equal(dequantize(back, back_scales), dequantize(packed, scales))
    nan_scales = scales.clone()
    nan_scales.view(torch.uint8)[3, 1] = 0x7F
    with pytest.raises(ValueError, match=r"w13: block scale at index \[3, 1\] is NaN"):
        pack_nvfp4_weights(packed, nan_scales, "w13")


class _RecordedLaunch:
    """Stands in for a `@triton.jit` kernel: records `kernel[grid](*args, **meta)`."""

    def __init__(self) -> None:
        self.args: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.args.append(args)


def test_precomputed_per_row_globals_reach_the_kernels_without_a_copy(monkeypatch):
    """The engine adapters build float32 per-row globals once at load ([N], [E, 2I], [E, H]); the launchers
    hand those very tensors to the kernels (on main the MoE launcher rebuilt both per call). [E] / 0-d
    globals are still expanded."""
    from nvfp4_ext.kernels import nvfp4_gemm_kernel, nvfp4_moe_kernel

    launches = {name: _RecordedLaunch() for name in ("gemm", "gate_up", "down")}
    monkeypatch.setattr(nvfp4_gemm_kernel, "_nvfp4_gemm_kernel", launches["gemm"])
    monkeypatch.setattr(nvfp4_moe_kernel, "_moe_gate_up_kernel", launches["gate_up"])
    monkeypatch.setattr(nvfp4_moe_kernel, "_moe_down_kernel", launches["down"])
    args = _moe_args(torch.tensor([[0, 1], [3, 2]]))
    w13_global = args[3][:, None].expand(4, 32).contiguous()
    w2_global = args[6][:, None].expand(4, 32).contiguous()
    args[3], args[6] = w13_global, w2_global
    nvfp4_moe_triton(*args)
    assert launches["gate_up"].args[0][3].data_ptr() == w13_global.data_ptr()
    assert launches["down"].args[0][3].data_ptr() == w2_global.data_ptr()
    q = quantize_nvfp4(torch.randn(48, 64))
    row_global = q.global_scale * torch.linspace(0.5, 2, 48)
    nvfp4_gemm_triton(torch.randn(2, 64, dtype=torch.float16), q.qdata, q.scale, row_global)
    assert launches["gemm"].args[0][3].data_ptr() == row_global.data_ptr()
    nvfp4_gemm_triton(torch.randn(2, 64, dtype=torch.float16), q.qdata, q.scale, q.global_scale)
    assert launches["gemm"].args[1][3].shape == (48,)  # a 0-d global still becomes one per row
