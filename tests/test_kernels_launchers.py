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


def _prmt(a: torch.Tensor, selector: int) -> torch.Tensor:
    """PTX prmt.b32 d, a, 0, selector (default mode): result byte k is byte (selector >> 4k) & 7 of {0, a}."""
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [torch.zeros_like(a)] * 4
    return sum(source[(selector >> (4 * k)) & 7] << (8 * k) for k in range(4))


def _bf16_halves(word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values of a b32 register (low half first), as float32."""
    halves = [(word & 0xFFFF), (word >> 16) & 0xFFFF]
    return tuple(
        ((h + 0x8000) % 0x10000 - 0x8000).to(torch.int16).view(torch.bfloat16).float() for h in halves
    )


def test_ptx_fast_decode_bit_math_reproduces_e2m1_times_scale():
    """A bit-level model of `_E2M1_BF16X2_ASM` (prmt, and, mul.lo, and, bf16 fma) over every byte pair and
    e4m3 scale. It checks the constants and the exactness argument; whether the GPU executes the PTX as
    modelled is for `tests/test_kernels_gpu.py` on a GPU."""
    from nvfp4_ext.kernels.nvfp4_tile import FAST_DECODE_GLOBAL_FACTOR

    from nvfp4_ext.format import E2M1_VALUES

    byte0 = torch.arange(256, dtype=torch.int64)
    byte1 = (byte0 * 37 + 11) % 256  # a second byte pattern in the other half of the pair
    word = byte0 | (byte1 << 8) | ((255 - byte0) << 16) | (byte1 << 24)
    pair01, pair23 = _prmt(word, 0x4140), _prmt(word, 0x4342)
    assert torch.equal(pair01, byte0 | (byte1 << 16)) and torch.equal(pair23, (255 - byte0) | (byte1 << 16))
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    scales = scales[torch.isfinite(scales)]
    scale_bf16 = (scales * 2.0**117).to(torch.bfloat16).float()
    assert torch.equal(scale_bf16, scales * 2.0**117)  # e4m3 * 2**117 is exact and finite in bf16
    for pair, (first, second) in ((pair01, (byte0, byte1)), (pair23, (255 - byte0, byte1))):
        for mask, multiplier, shift in ((0x000F000F, 0x1040, 0), (0x00F000F0, 0x104, 4)):
            bits = ((pair & mask) * multiplier) & 0x81C081C0
            for value, byte in zip(_bf16_halves(bits), (first, second), strict=True):
                expected = E2M1_VALUES[(byte >> shift) & 0xF]
                assert torch.equal(value * 2.0**126, expected)
                # fma.rn.bf16x2 by scale * 2**117: <= 6 significant bits, so the rounding is exact.
                product = (value[:, None] * scale_bf16[None, :]).to(torch.bfloat16).float()
                torch.testing.assert_close(
                    product * FAST_DECODE_GLOBAL_FACTOR, expected[:, None] * scales[None, :], rtol=0, atol=0
                )


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
