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


def _f16_bits_to_f32_bits(half: torch.Tensor) -> torch.Tensor:
    """fp16 patterns (int64, 0..0xFFFF) -> the fp32 pattern of the same value (exact, as `cvt.f32.f16`)."""
    value = ((half + 0x8000) % 0x10000 - 0x8000).to(torch.int16).view(torch.float16).float()
    return value.view(torch.int32).long() & 0xFFFFFFFF


def _e4m3_byte_to_f16_bits(byte: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes (int64) -> fp16 patterns of their values (exact: e4m3 subnormals are fp16 normals)."""
    value = byte.to(torch.uint8).view(torch.float8_e4m3fn).half()
    return value.view(torch.int16).long() & 0xFFFF


class _PtxMachine:
    """Executes the straight-line b32 PTX of `E2M1_BF16X2_ASM` on int64 tensors (one lane per element).

    Only the opcodes the shipped string uses are known; anything else fails the test, so an edit to the PTX
    cannot silently escape this model. Semantics from the PTX ISA: `prmt.b32` default mode (selector nibble
    k picks byte n & 7 of {b, a} for result byte k; n & 8 replicates that byte's sign bit), `mul.lo.u32`,
    `and.b32`, `mov.b32`, `cvt.rn.bf16x2.f32 d, a, b` (a -> upper half), `fma.rn.bf16x2` (per half, one
    rounding of the exact a * b + c); for `E4M3_MARLIN_SCALE_ASM`: `cvt.u16.u32` (low 16 bits),
    `cvt.rn.f16x2.e4m3x2 d, a` (a's upper byte -> d's upper half; exact), `mov.b32 {lo, hi}, a` (unpack),
    `cvt.f32.f16` (exact) and `mul.f32` (one rounding; `0f` immediates are fp32 bit patterns).
    """

    def __init__(self, operands: dict[str, torch.Tensor]) -> None:
        self.registers = dict(operands)

    def value(self, token: str) -> torch.Tensor:
        token = token.strip()
        if token in self.registers:
            return self.registers[token]
        if token.startswith("0f"):  # PTX fp32 immediate, written as its bit pattern
            return torch.tensor(int(token[2:], 16), dtype=torch.int64)
        return torch.tensor(int(token, 0), dtype=torch.int64)

    def run(self, asm: str) -> None:
        import re

        for line in asm.splitlines():
            line = line.strip().rstrip(";")
            if not line or line in "{}" or line.startswith(".reg"):
                continue
            opcode, rest = line.split(None, 1)
            unpack = re.fullmatch(r"\{\s*(\w+)\s*,\s*(\w+)\s*\}\s*,\s*(\S+)", rest)
            if opcode == "mov.b32" and unpack:
                source = self.value(unpack.group(3))
                self.registers[unpack.group(1)] = source & 0xFFFF
                self.registers[unpack.group(2)] = (source >> 16) & 0xFFFF
                continue
            args = [a.strip() for a in rest.split(",")]
            dest, sources = args[0], [self.value(a) for a in args[1:]]
            if opcode in ("mov.b32",):
                result = sources[0] & 0xFFFFFFFF
            elif opcode == "and.b32":
                result = sources[0] & sources[1]
            elif opcode == "mul.lo.u32":
                result = (sources[0] * sources[1]) & 0xFFFFFFFF
            elif opcode == "prmt.b32":
                a, b, selector = sources
                a, b, selector = torch.broadcast_tensors(a, b, selector)
                pool = torch.stack([(r >> (8 * i)) & 0xFF for r in (a, b) for i in range(4)])
                result = torch.zeros_like(a)
                for k in range(4):
                    nibble = (selector >> (4 * k)) & 0xF
                    picked = pool.gather(0, (nibble & 7)[None]).squeeze(0)
                    picked = torch.where((nibble & 8) != 0, torch.where(picked >= 0x80, 0xFF, 0), picked)
                    result = result | (picked << (8 * k))
            elif opcode == "cvt.rn.bf16x2.f32":
                high, low = (_float_to_bf16_bits(s.to(torch.int32).view(torch.float32)) for s in sources)
                result = (high << 16) | low
            elif opcode == "fma.rn.bf16x2":
                halves = []
                for shift in (0, 16):
                    a, b, c = (_bf16_to_float((s >> shift) & 0xFFFF) for s in sources)
                    halves.append(_float_to_bf16_bits(a * b + c) << shift)  # fp64: a * b + c is exact
                result = halves[0] | halves[1]
            elif opcode == "cvt.u16.u32":
                result = sources[0] & 0xFFFF
            elif opcode == "cvt.rn.f16x2.e4m3x2":
                pair = sources[0]
                result = (_e4m3_byte_to_f16_bits((pair >> 8) & 0xFF) << 16) | _e4m3_byte_to_f16_bits(pair & 0xFF)
            elif opcode == "cvt.f32.f16":
                result = _f16_bits_to_f32_bits(sources[0])
            elif opcode == "mul.f32":
                a, b = (s.to(torch.int32).view(torch.float32) for s in torch.broadcast_tensors(*sources))
                result = (a * b).view(torch.int32).long() & 0xFFFFFFFF
            else:
                raise AssertionError(f"the PTX model does not know {opcode!r}: extend it with the new code")
            assert re.fullmatch(r"\$?\w+", dest), dest
            self.registers[dest] = result


def _run_scale_ptx(raw: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns `E4M3_MARLIN_SCALE_ASM` (the shipped text) produces for e4m3 bytes `raw` (int64)."""
    from nvfp4_ext.kernels.nvfp4_tile import E4M3_MARLIN_SCALE_ASM

    machine = _PtxMachine({"$1": raw})
    machine.run(E4M3_MARLIN_SCALE_ASM)
    return machine.registers["$0"]


def test_marlin_scale_ptx_decodes_every_e4m3_byte_times_2_117():
    """sm_89+'s scale path, `E4M3_MARLIN_SCALE_ASM`, through the PTX model over all 256 bytes: each finite
    e4m3 value (torch's decoding: signs, subnormals, 448) comes out as exactly value * 2**117 in fp32."""
    from nvfp4_ext.kernels.nvfp4_tile import MARLIN_SCALE_FACTOR

    raw = torch.arange(256, dtype=torch.int64)
    expected = raw.to(torch.uint8).view(torch.float8_e4m3fn).double() * MARLIN_SCALE_FACTOR
    got = _run_scale_ptx(raw).to(torch.int32).view(torch.float32).double()
    finite = torch.isfinite(expected)
    assert int(finite.sum()) == 254
    assert torch.equal(got[finite], expected[finite])
    assert (got[raw == 0x38] == MARLIN_SCALE_FACTOR).all()  # e4m3 1.0


@pytest.mark.parametrize("scale_path", ["sm80-integer", "sm89-cvt-ptx"])
def test_marlin_decode_ptx_reproduces_e2m1_times_scale_for_every_byte_and_scale(scale_path):
    """Runs the shipped `E2M1_BF16X2_ASM` text (its constants, selectors and operand order, not a copy)
    through a PTX model over every packed byte in every position of the register and every finite e4m3
    block scale, different per byte; compares with ModelOpt's E2M1 table and torch's e4m3 decoding. The
    scale operands are e4m3 * 2**117 in fp32 as sm_80's integer decode computes them, or (sm_89+) what the
    shipped `E4M3_MARLIN_SCALE_ASM` makes of the e4m3 bytes, so byte -> scale -> weight is modelled end to
    end. Whether the GPU executes PTX as the ISA says is for `pytest -m gpu tests/test_kernels_gpu.py`."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import e2m1_values

    from nvfp4_ext.kernels.nvfp4_tile import E2M1_BF16X2_ASM, MARLIN_GLOBAL_FACTOR, MARLIN_SCALE_FACTOR

    codes = torch.arange(256, dtype=torch.int64)
    scale_bytes = torch.arange(256, dtype=torch.int64)
    scales = scale_bytes.to(torch.uint8).view(torch.float8_e4m3fn).double()
    scale_bytes = scale_bytes[torch.isfinite(scales)]
    scales = scales[torch.isfinite(scales)]  # 254 values: signs, subnormals, 448
    byte_grid, scale_grid = torch.meshgrid(codes, torch.arange(len(scales)), indexing="ij")
    byte_grid, scale_grid = byte_grid.reshape(-1), scale_grid.reshape(-1)
    # Four different bytes and four different scales per register, so pairing or operand-order mistakes show.
    word_bytes = [(byte_grid * mult + add) % 256 for mult, add in ((1, 0), (37, 11), (101, 200), (223, 77))]
    picks = [(scale_grid * mult + add) % len(scales) for mult, add in ((1, 0), (7, 3), (13, 100), (29, 41))]
    word_scales = [scales[pick] for pick in picks]
    word = word_bytes[0] | (word_bytes[1] << 8) | (word_bytes[2] << 16) | (word_bytes[3] << 24)
    scale_bits = []
    for scale, pick in zip(word_scales, picks):
        if scale_path == "sm89-cvt-ptx":
            scale_bits.append(_run_scale_ptx(scale_bytes[pick]))
            continue
        as_fp32 = (scale * MARLIN_SCALE_FACTOR).float()
        assert torch.equal(as_fp32.double(), scale * MARLIN_SCALE_FACTOR)  # what the kernel passes, exactly
        scale_bits.append(as_fp32.view(torch.int32).long() & 0xFFFFFFFF)
    machine = _PtxMachine({"$4": word, **{f"${5 + j}": scale_bits[j] for j in range(4)}})
    machine.run(E2M1_BF16X2_ASM)
    table = e2m1_values.double()
    # Outputs: $0/$1 = low nibbles of bytes 0-1 / 2-3, $2/$3 = high nibbles (elementwise pack=4 contract).
    for register, shift, first_byte in (("$0", 0, 0), ("$1", 0, 2), ("$2", 4, 0), ("$3", 4, 2)):
        for half in (0, 1):
            byte_index = first_byte + half
            got = _bf16_to_float((machine.registers[register] >> (16 * half)) & 0xFFFF) * MARLIN_GLOBAL_FACTOR
            expected = table[(word_bytes[byte_index] >> shift) & 0xF] * word_scales[byte_index]
            assert torch.equal(got, expected), (register, half)


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
