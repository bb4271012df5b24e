"""NVFP4/FP8 format reference: properties (hypothesis), hand-computed known answers, ModelOpt and
compressed-tensors oracles.

What "identical" means against compressed-tensors (CT), precisely:
  * bit layout: both decode all 256 bytes to the same 16 values, and pack grid values to the same bytes
    (even element in the low nibble; bit 3 the sign). Exception: an input of exactly -0.0 keeps its sign
    bit in CT (code 8) and becomes code 0 in ModelOpt; both decode to zero.
  * rounding: CT's `cast_to_fp4` rounds ties to even like ModelOpt; only CT's `pack_fp4_to_uint8`, fed
    unrounded values, breaks ties toward zero (argmin) - the compressor never does that.
  * full compressor, when the global scale is a power of two (amax = 2688 * 2**k): `weight_packed` and
    `weight_scale` are byte-identical to ours, `weight_global_scale` is exactly 1 / `weight_scale_2`.
    Otherwise CT computes 2688/amax directly while we store fl32(1/fl32(amax/2688)): the two differ by at
    most one float32 ulp, and so may the codes/scales of values sitting on a rounding boundary.
  * zero blocks: ModelOpt sets the block scale to 1.0, CT to 0.125; the codes (all zero) agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nvfp4_ext.format import (
    E2M1_VALUES,
    cast_to_e2m1,
    dequantize_fp8,
    dequantize_nvfp4,
    e2m1_to_float,
    nvfp4_global_scale,
    pack_uint4,
    quantize_fp8,
    quantize_nvfp4,
    stored_global_scale,
    unpack_uint4,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
ALL_BYTES = torch.arange(256, dtype=torch.uint8)


def weights(max_rows: int = 4, max_blocks: int = 3):
    """Float32 weights [rows, 16 * blocks] with magnitudes spanning many binades (no subnormals)."""
    shape = st.tuples(st.integers(1, max_rows), st.integers(1, max_blocks).map(lambda b: 16 * b))
    values = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False)
    return shape.flatmap(lambda s: arrays(np.float32, s, elements=values)).map(torch.from_numpy)


# ------------------------------------------------------------------------------------------- properties
@FAST
@given(arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 8).map(lambda n: 2 * n)),
              elements=st.integers(0, 15)))  # fmt: skip
def test_pack_unpack_round_trip_all_codes(codes: np.ndarray) -> None:
    c = torch.from_numpy(codes)
    packed = pack_uint4(c)
    assert packed.shape == (*c.shape[:-1], c.shape[-1] // 2)
    assert torch.equal(unpack_uint4(packed), c)
    assert torch.equal(packed[..., 0] & 0x0F, c[..., 0])  # even element in the low nibble


def test_every_byte_round_trips() -> None:
    assert torch.equal(pack_uint4(unpack_uint4(ALL_BYTES)), ALL_BYTES)
    assert torch.equal(e2m1_to_float(torch.arange(16, dtype=torch.uint8)), E2M1_VALUES)


def _nearest_grid_error(x: torch.Tensor) -> torch.Tensor:
    """Distance from |x| (in block-scale units) to the nearest E2M1 magnitude, saturating at 6."""
    return (x.abs().unsqueeze(-1) - GRID).abs().amin(-1)


@FAST
@given(weights())
def test_quantize_dequantize_is_nearest_grid_point(w: torch.Tensor) -> None:
    """Each dequantized value is the E2M1 point nearest to w / (block scale * global): the error is at most
    half the local step (0.25, 0.5 or 1 scale units), plus the excess beyond 6 when a block saturates."""
    assume(w.abs().max() > 1e-3)
    q = quantize_nvfp4(w)
    dq = q.dequantize().double()
    unit = (q.scale.double() * q.global_scale.double()).repeat_interleave(16, dim=-1)
    x = w.double() / unit
    error = (dq - w.double()).abs() / unit
    expected = _nearest_grid_error(x)
    assert torch.all(error <= expected + 1e-5 * (1 + x.abs()))
    half_step = torch.where(x.abs() < 2, 0.25, torch.where(x.abs() < 4, 0.5, 1.0))
    assert torch.all(error <= torch.maximum(half_step, x.abs() - 6) + 1e-5 * (1 + x.abs()))


@FAST
@given(
    codes=arrays(np.uint8, (3, 32), elements=st.integers(0, 15)),
    scales=arrays(np.uint8, (3, 2), elements=st.integers(0x08, 0x7E)),  # positive normal e4m3 (0.0156..448)
    exponent=st.integers(-20, 4),
)
def test_values_on_the_grid_are_exact(codes: np.ndarray, scales: np.ndarray, exponent: int) -> None:
    c = torch.from_numpy(codes)
    c[:, 0::16] = 7  # every block reaches +6, so its amax is 6 * scale * global
    s = torch.from_numpy(scales).view(torch.float8_e4m3fn)
    s[0] = 448.0  # the largest block scale maps the tensor amax to 6 * 448 exactly
    global_scale = torch.tensor(2.0**exponent)
    w = dequantize_nvfp4(pack_uint4(c), s, global_scale)
    q = quantize_nvfp4(w)  # default scales recover global_scale and s exactly
    assert q.global_scale.item() == global_scale.item()
    assert torch.equal(q.scale.view(torch.uint8), s.view(torch.uint8))
    assert torch.equal(q.dequantize(), w)
    negative_zero = c == 8
    assert torch.equal(unpack_uint4(q.qdata)[~negative_zero], c[~negative_zero])  # -0 encodes as +0


@FAST
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 3), st.just(32)),
              elements=st.floats(-100, 100, width=32, allow_subnormal=False)))  # fmt: skip
def test_3d_experts_match_per_expert_2d(w: np.ndarray) -> None:
    experts = torch.from_numpy(w)
    assume(bool((experts.abs().amax(dim=(1, 2)) > 0).all()))
    q = quantize_nvfp4(experts)
    assert q.global_scale.shape == (experts.shape[0],)
    for e in range(experts.shape[0]):
        single = quantize_nvfp4(experts[e])
        assert torch.equal(q.qdata[e], single.qdata)
        assert torch.equal(q.scale[e].view(torch.uint8), single.scale.view(torch.uint8))
        assert q.global_scale[e].item() == single.global_scale.item()
        assert torch.equal(q.dequantize()[e], single.dequantize())


# ------------------------------------------------------------------------------------------- known answers
def test_known_answer_block_with_amax_6() -> None:
    w = torch.tensor([[6, -6, 0.2, 0.3, 0.7, 0.8, 1.2, 1.3, 1.7, 1.8, 2.4, 2.6, 3.4, 3.6, 4.9, 5.1]])
    q = quantize_nvfp4(w)
    assert q.global_scale.item() == torch.tensor(6 / 2688, dtype=torch.float32).item()  # amax / (6 * 448)
    assert q.scale.float().tolist() == [[448.0]]  # block amax / (6 * global) = 448
    # codes 7,15 | 0,1 | 1,2 | 2,3 | 3,4 | 4,5 | 5,6 | 6,7 -> (odd << 4) | even
    assert q.qdata.tolist() == [[0xF7, 0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76]]


def test_known_answer_block_with_amax_0() -> None:
    w = torch.zeros(1, 32)
    w[0, 16:] = torch.linspace(-3, 3, 16)
    q = quantize_nvfp4(w)
    assert q.scale.float()[0, 0].item() == 1.0  # ModelOpt's rule for all-zero blocks
    assert q.qdata[0, :8].tolist() == [0] * 8
    assert torch.equal(q.dequantize()[0, :16], torch.zeros(16))


def test_known_answer_ties_round_to_even() -> None:
    """With global 2**-6 and block amax 6 the block scale is 64 and one scale unit is exactly 1.0."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    w = torch.tensor([ties + [-t for t in ties] + [6.0, 0.0]])
    q = quantize_nvfp4(w, global_scale=torch.tensor(2.0**-6))
    assert q.scale.float().item() == 64.0
    expected = [0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 7, 0]  # .25->0 .75->1 1.25->1 ... 5->4
    assert unpack_uint4(q.qdata)[0].tolist() == expected
    assert e2m1_to_float(torch.tensor(expected, dtype=torch.uint8)).abs().tolist() == [
        0, 1, 1, 2, 2, 4, 4, 0, 1, 1, 2, 2, 4, 4, 6, 0,
    ]  # fmt: skip


def test_cast_to_e2m1_bounds() -> None:
    x = torch.tensor([0.2499, 0.2501, 0.7499, 0.7501, 5.0, 5.0001, 100.0, -100.0])
    assert e2m1_to_float(cast_to_e2m1(x)).tolist() == [0.0, 0.5, 0.5, 1.0, 4.0, 6.0, 6.0, -6.0]


def test_global_scale_conventions() -> None:
    multiplier = torch.tensor(2.0**-10)
    assert stored_global_scale(multiplier, "compressed_tensors").item() == 1024.0
    assert stored_global_scale(multiplier, "modelopt").item() == multiplier.item()
    w = torch.randn(8, 32)
    q = quantize_nvfp4(w)
    divisor = stored_global_scale(q.global_scale, "compressed_tensors")
    ct = dequantize_nvfp4(q.qdata, q.scale, divisor, convention="compressed_tensors")
    torch.testing.assert_close(ct, q.dequantize(), rtol=2**-23, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_fp8_round_trip(granularity: str) -> None:
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_fp8(w, granularity)  # type: ignore[arg-type]
    assert q.dtype == torch.float8_e4m3fn
    expected_shape = {"tensor": (), "channel": (200, 1), "block": (2, 3)}[granularity]
    assert tuple(scale.shape) == expected_shape
    dq = dequantize_fp8(q, scale)
    unit = scale.max() if granularity != "channel" else scale
    assert ((dq - w).abs() <= w.abs() / 16 + unit * 2.0**-9).all()  # e4m3: 3 mantissa bits


# ------------------------------------------------------------------------------------------- ModelOpt oracle
@pytest.fixture(scope="module")
def modelopt_nvfp4():
    module = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    return module.NVFP4QTensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(48, 64), (3, 32, 48)])
def test_modelopt_oracle_byte_identical(modelopt_nvfp4, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 0.02).to(dtype)
    w.reshape(-1, 16)[5] = 0  # one all-zero block
    w.reshape(-1)[7] = 0.02 * 0.75  # a value near a tie
    qtensor, scale, scale_2 = modelopt_nvfp4.quantize(w, 16)
    ours = quantize_nvfp4(w, global_scale=nvfp4_global_scale(w, per_leading_dim=False))
    assert ours.global_scale.item() == scale_2.item()
    assert torch.equal(ours.scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours.qdata, qtensor._quantized_data)
    torch.testing.assert_close(ours.dequantize(), qtensor.dequantize(dtype=torch.float32, scale=scale,
                               double_scale=scale_2, block_sizes={-1: 16}), rtol=0, atol=0)  # fmt: skip


# ------------------------------------------------------------------------------ compressed-tensors oracle
@pytest.fixture(scope="module")
def ct():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    def compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
        """CT's own NVFP4 path: generate_gparam -> per-block qparams -> NVFP4PackedCompressor.compress."""
        args = NVFP4["weights"]
        global_scale = generate_gparam(w.min(), w.max())
        blocks = w.reshape(w.shape[0], -1, 16)
        scale, zero_point = calculate_qparams(
            blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale
        )
        state = {"weight": w, "weight_scale": scale, "weight_global_scale": global_scale,
                 "weight_zero_point": zero_point}  # fmt: skip
        return NVFP4PackedCompressor.compress(state, QuantizationScheme(targets=["Linear"], **NVFP4))

    return {"compress": compress, "pack": pack_fp4_to_uint8, "unpack": unpack_fp4_from_uint8}


def test_ct_bit_layout(ct) -> None:
    theirs = ct["unpack"](ALL_BYTES.reshape(1, 256), 1, 512, dtype=torch.float32)
    ours = e2m1_to_float(unpack_uint4(ALL_BYTES)).reshape(1, 512)
    assert torch.equal(theirs, ours)
    grid = E2M1_VALUES[[c for c in range(16) if c != 8]]  # every value but -0.0
    values = grid[torch.randint(0, 15, (4, 32), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(ct["pack"](values), pack_uint4(cast_to_e2m1(values)))
    negative_zero = torch.tensor([[-0.0, 1.0]])
    assert ct["pack"](negative_zero).item() == 0x28 and pack_uint4(cast_to_e2m1(negative_zero)).item() == 0x20


def test_ct_compressor_byte_identical_with_power_of_two_global(ct) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    w = w / w.abs().max() * (2688 * 2.0**-10)
    w[3, 16:32] = 0.0  # a zero block: scale 1.0 here, 0.125 in CT
    theirs = ct["compress"](w)
    ours = quantize_nvfp4(w)
    assert (
        theirs["weight_global_scale"].item()
        == stored_global_scale(ours.global_scale, "compressed_tensors").item()
    )
    assert torch.equal(theirs["weight_packed"], ours.qdata)
    zero_block = torch.zeros_like(ours.scale, dtype=torch.bool)
    zero_block[3, 1] = True
    assert (
        theirs["weight_scale"].float()[zero_block].item() == 0.125
        and ours.scale.float()[zero_block].item() == 1
    )
    assert torch.equal(
        theirs["weight_scale"].view(torch.uint8)[~zero_block], ours.scale.view(torch.uint8)[~zero_block]
    )


def test_ct_compressor_general_case_within_one_ulp(ct) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.037
    theirs = ct["compress"](w)
    ours = quantize_nvfp4(w)
    ours_stored = stored_global_scale(ours.global_scale, "compressed_tensors")
    assert abs(theirs["weight_global_scale"].item() - ours_stored.item()) <= math.ulp(ours_stored.item())
    same_codes = (unpack_uint4(theirs["weight_packed"]) == unpack_uint4(ours.qdata)).float().mean().item()
    assert same_codes > 0.999  # only values on a rounding boundary can differ
    a = dequantize_nvfp4(theirs["weight_packed"], theirs["weight_scale"], theirs["weight_global_scale"],
                         convention="compressed_tensors")  # fmt: skip
    torch.testing.assert_close(a, ours.dequantize(), rtol=1e-6, atol=float(ours.global_scale) * 1e-6)


def test_all_zero_tensor_quantizes_to_zero_codes_and_unit_scales():
    """An all-zero weight (or one all-zero expert) has global scale 0; its block scales must be 1.0, not the NaN
    that ModelOpt's 0/0 stores, and its codes 0, so the tensor dequantizes to exact zeros."""
    w = torch.randn(3, 16, 32)
    w[1] = 0
    q = quantize_nvfp4(w)
    assert q.global_scale[1] == 0
    assert torch.equal(q.scale[1].float(), torch.ones(16, 2))
    assert int(q.qdata[1].max()) == 0
    assert torch.equal(q.dequantize()[1], torch.zeros(16, 32))
    assert not torch.isnan(q.dequantize()).any()
