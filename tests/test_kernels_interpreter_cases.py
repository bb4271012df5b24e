"""Triton kernels vs their pure-torch references, run by Triton's CPU interpreter.

`TRITON_INTERPRET=1` must be set before Triton decorates a kernel, and it would turn every other module's
kernels into interpreted ones too. So this module skips itself unless the variable is set, and
`test_kernels_interpreter.py` runs it in a subprocess that sets it (that is how the default `pytest` run
executes these cases).

Tolerances. The tensor-core operands are exact: e2m1 * e4m3 and e4m3 values fit fp16 exactly, activations
are fp16 or fp32 (fp32 dots use "ieee" precision). What remains is fp32 accumulation order, split-K atomics,
the final rounding to the output dtype and, in the MoE, the rounding of the intermediate activation to the
activation dtype. Each check therefore bounds |kernel - reference| by
    out_eps * |reference| + acc_eps * magnitude,
where `magnitude` is the same product computed on absolute values (the natural scale of rounding error),
out_eps is one output ulp (2**-10 for fp16, 2**-23 for fp32) and acc_eps is 2**-16 (fp32 accumulation over
K <= 2k terms, with margin). The MoE bound also carries the intermediate's rounding through |W2|
(`_moe_error_bound`).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "runs in the TRITON_INTERPRET=1 subprocess of test_kernels_interpreter.py", allow_module_level=True
    )

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from nvfp4_ext.kernels import fp8_gemm, nvfp4_gemm, nvfp4_moe  # noqa: E402
from nvfp4_ext.kernels.nvfp4_gemm_kernel import GemmConfig  # noqa: E402
from nvfp4_ext.kernels.nvfp4_moe_kernel import MoeConfig, TileConfig  # noqa: E402
from nvfp4_ext.kernels.nvfp4_tile import (  # noqa: E402
    E2M1_FP16_SCALE,
    e2m1_pair_to_float,
    e4m3_to_float,
    row_offsets,
)
from nvfp4_ext.kernels.reference import (  # noqa: E402
    apply_gated_activation,
    fp8_gemm_ref,
    nvfp4_gemm_ref,
    nvfp4_moe_ref,
)

from nvfp4_ext.format import (  # noqa: E402
    E2M1_VALUES,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8,
    quantize_nvfp4,
)

OUT_EPS = {torch.float16: 2.0**-10, torch.float32: 2.0**-23}
ACC_EPS = 2.0**-16


def assert_within(actual, expected, out_eps, accumulation_error):
    """|actual - expected| <= out_eps*|expected| + accumulation_error everywhere, plus an SQNR floor."""
    diff = (actual.double() - expected.double()).abs()
    bound = out_eps * expected.double().abs() + accumulation_error.double()
    worst = (diff - bound).max().item()
    assert worst <= 0, f"max excess over the error bound: {worst:.3g} (max diff {diff.max().item():.3g})"
    sqnr = 10 * torch.log10(expected.double().pow(2).sum() / diff.pow(2).sum().clamp_min(1e-300))
    assert sqnr > 50, f"SQNR {sqnr:.1f} dB"
    assert expected.abs().max() > 0, "reference is all zeros: the case tests nothing"


# ---------------------------------------------------------------------------------------- decode helpers
@triton.jit
def _decode_probe(codes_ptr, low_ptr, high_ptr, e4m3_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    codes = tl.load(codes_ptr + offs)
    low, high = e2m1_pair_to_float(codes.to(tl.int32))
    tl.store(low_ptr + offs, low)
    tl.store(high_ptr + offs, high)
    tl.store(e4m3_ptr + offs, e4m3_to_float(codes))


def test_device_decoders_match_format_tables_for_every_byte():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    low, high, scales = torch.empty(256), torch.empty(256), torch.empty(256)
    _decode_probe[(1,)](codes, low, high, scales, N=256)
    torch.testing.assert_close(low * E2M1_FP16_SCALE, E2M1_VALUES[codes.long() & 0xF], rtol=0, atol=0)
    torch.testing.assert_close(high * E2M1_FP16_SCALE, E2M1_VALUES[codes.long() >> 4], rtol=0, atol=0)
    finite = (codes & 0x7F) != 0x7F  # 0x7F / 0xFF are NaN in e4m3fn; scales never hold them
    expected = codes.view(torch.float8_e4m3fn).float()
    torch.testing.assert_close(scales[finite], expected[finite], rtol=0, atol=0)


@triton.jit
def _row_offset_probe(rows_ptr, out_ptr, stride, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, row_offsets(tl.load(rows_ptr + offs), stride))


def test_row_offsets_do_not_wrap_past_two_to_the_31():
    """The row offsets every kernel uses for activations and outputs: a [8192, 262144] output (LM head at
    8192 tokens) has M*N = 2**31; int32 row * stride arithmetic wraps there (as it did on main)."""
    rows = torch.tensor([0, 1, 8191, 8192, 65535, 2**20, 2**24, 2**31 - 1], dtype=torch.int32)
    out = torch.zeros(8, dtype=torch.int64)
    _row_offset_probe[(1,)](rows, out, 262144, N=8)
    assert out.tolist() == [r * 262144 for r in rows.tolist()]


# ------------------------------------------------------------------------------------------- NVFP4 GEMM
def _nvfp4_weight(n, k, per_row, seed):
    gen = torch.Generator().manual_seed(seed)
    # Columns spanning 4 decades exercise small and subnormal e4m3 block scales.
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, k)
    q = quantize_nvfp4(w)
    global_scale = q.global_scale * torch.linspace(0.5, 2.0, n) if per_row else q.global_scale
    return q.qdata, q.scale, global_scale


GEMM_CASES = [
    # M, N, K, dtype, bias, per-row global, forced config (None = shipped selection)
    (1, 48, 160, torch.float32, True, True, None),
    (3, 80, 96, torch.float16, False, False, None),
    (16, 48, 2080, torch.float16, True, True, None),  # shipped decode tile with split-K 4
    (33, 112, 304, torch.float16, True, True, GemmConfig(32, 64, 128)),
    (33, 48, 208, torch.float32, False, True, None),  # shipped mid tile
    (130, 48, 96, torch.float16, True, False, None),  # shipped prefill tile
    (3, 16, 64, torch.float32, True, False, GemmConfig(16, 16, 32, split_k=2)),
    (3, 144, 288, torch.float16, True, True, GemmConfig(16, 128, 128)),  # the shipped LM-head decode tile
]


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype", "bias", "per_row", "config"),
    GEMM_CASES,
    ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-{str(c[3])[6:]}" for c in GEMM_CASES],
)
def test_nvfp4_gemm_matches_reference(m, n, k, dtype, bias, per_row, config):
    qdata, scale, global_scale = _nvfp4_weight(n, k, per_row, seed=m * 1000 + n)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen) if bias else None
    y = nvfp4_gemm(x, qdata, scale, global_scale, b, backend="triton", config=config)
    assert y.dtype == dtype and y.shape == (m, n)
    expected = nvfp4_gemm_ref(x, qdata, scale, global_scale, b)
    magnitude = x.double().abs() @ dequantize_nvfp4(qdata, scale, global_scale).double().abs().t()
    assert_within(y, expected, OUT_EPS[dtype], ACC_EPS * magnitude)


# -------------------------------------------------------------------------------------------------- MoE
def _routing(kind, tokens, top_k, experts, gen):
    if kind == "random":
        return torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    if kind == "two_experts":  # every other expert gets zero tokens
        return torch.tensor([1, 5]).repeat(tokens, top_k // 2 + 1)[:, :top_k]
    if kind == "one_expert":  # all pairs, including both slots of a token, to expert 6
        return torch.full((tokens, top_k), 6)
    raise ValueError(kind)


def _moe_error_bound(x, w13, w2, topk_weights, topk_ids, activation, hidden_eps):
    """Bound on the rounding error of the MoE output before its final rounding.

    Per (token, expert) pair: the intermediate h = act(g) * u is rounded to the activation dtype
    (hidden_eps * |h|), and fp32 errors in g and u (ACC_EPS times their |W13| @ |x| magnitudes) reach h at
    most 1.2 * (|g| + |u|) times larger (|act'| <= 1.13 and |act(g)| <= |g| for gelu_tanh and silu).
    Both then pass through |W2| and the router weight.
    """
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = w13[e].double() @ x[t].double()
            gate_up_mag = w13[e].double().abs() @ x[t].double().abs()
            gate, up = gate_up[:inter], gate_up[inter:]
            hidden = apply_gated_activation(gate, up, activation).double().abs()
            from_gemm1 = 1.2 * (gate.abs() + up.abs()) * (gate_up_mag[:inter] + gate_up_mag[inter:])
            per_pair = hidden_eps * hidden + ACC_EPS * (hidden + from_gemm1)
            out[t] += float(topk_weights[t, j]) * (w2[e].double().abs() @ per_pair)
    return out


MOE_CASES = [
    # E, H, I, T, top_k, dtype, activation, routing, per-row global, forced config
    (8, 64, 32, 1, 8, torch.float32, "gelu_tanh", "random", True, None),  # top-8 of 8: every expert
    (8, 64, 48, 3, 1, torch.float16, "silu", "random", False, None),  # top-1, I tail in the 32-wide tile
    (8, 96, 32, 16, 2, torch.float16, "gelu_tanh", "two_experts", True, None),  # six zero-token experts
    (8, 64, 32, 33, 2, torch.float32, "silu", "one_expert", False, None),  # all to one expert, 5 M-blocks
    (8, 64, 32, 33, 8, torch.float16, "gelu_tanh", "random", True, None),  # shipped prefill tiles
    (
        16,
        64,
        32,
        4,
        2,
        torch.float32,
        "gelu_tanh",
        "random",
        False,
        MoeConfig(32, TileConfig(64, 64), TileConfig(64, 128)),
    ),  # shipped mid tiles
]


@pytest.mark.parametrize(
    ("experts", "hidden", "inter", "tokens", "top_k", "dtype", "activation", "routing", "per_row", "config"),
    MOE_CASES,
    ids=[f"E{c[0]}-T{c[3]}-top{c[4]}-{c[7]}-{c[6]}-{str(c[5])[6:]}" for c in MOE_CASES],
)
def test_nvfp4_moe_matches_reference(
    experts, hidden, inter, tokens, top_k, dtype, activation, routing, per_row, config
):
    gen = torch.Generator().manual_seed(tokens * 100 + top_k)
    q13 = quantize_nvfp4(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5)
    q2 = quantize_nvfp4(torch.randn(experts, hidden, inter, generator=gen) / inter**0.5)
    g13, g2 = q13.global_scale, q2.global_scale
    if per_row:
        g13 = g13[:, None] * torch.linspace(0.5, 2.0, 2 * inter)
        g2 = g2[:, None] * torch.linspace(0.5, 2.0, hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    topk_ids = _routing(routing, tokens, top_k, experts, gen).to(torch.int32)
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    args = (x, q13.qdata, q13.scale, g13, q2.qdata, q2.scale, g2, topk_weights, topk_ids, activation)
    y = nvfp4_moe(*args, backend="triton", config=config)
    assert y.dtype == dtype and y.shape == (tokens, hidden)
    expected = nvfp4_moe_ref(*args)
    w13 = dequantize_nvfp4(q13.qdata, q13.scale, g13)
    w2 = dequantize_nvfp4(q2.qdata, q2.scale, g2)
    hidden_eps = OUT_EPS[dtype]  # the intermediate activation is stored in the activation dtype
    error = _moe_error_bound(x, w13, w2, topk_weights, topk_ids, activation, hidden_eps)
    assert_within(y, expected, OUT_EPS[dtype], error)


# --------------------------------------------------------------------------------------------- FP8 GEMM
FP8_CASES = [
    # M, N, K, dtype, granularity, bias, forced config
    (1, 48, 200, torch.float32, "tensor", True, None),
    (3, 144, 272, torch.float16, "block", False, None),
    (33, 80, 300, torch.float16, "channel", True, GemmConfig(32, 32, 64)),
    (16, 48, 1040, torch.float32, "block", True, GemmConfig(16, 32, 64, split_k=4)),
]


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype", "granularity", "bias", "config"),
    FP8_CASES,
    ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-{c[4]}-{str(c[3])[6:]}" for c in FP8_CASES],
)
def test_fp8_gemm_matches_reference(m, n, k, dtype, granularity, bias, config):
    gen = torch.Generator().manual_seed(m + n + k)
    weight, scale = quantize_fp8(torch.randn(n, k, generator=gen), granularity)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen) if bias else None
    y = fp8_gemm(x, weight, scale, b, backend="triton", config=config)
    assert y.dtype == dtype and y.shape == (m, n)
    expected = fp8_gemm_ref(x, weight, scale, b)
    magnitude = x.double().abs() @ dequantize_fp8(weight, scale).double().abs().t()
    assert_within(y, expected, OUT_EPS[dtype], ACC_EPS * magnitude)
