"""W4A4 numerics on CPU: `NVFP4_EXT_BACKEND=emulated` (FlashInfer's activation quantization + FP4 GEMM in
torch) against NVIDIA ModelOpt's own NVFP4 math.

Oracle: `NVFP4QTensor.quantize` of the activations under the checkpoint's `input_scale` (codes, e4m3 block
scales) and `NVFP4QTensor.dequantize` for weights. Documented differences (see
`nvfp4_ext.kernels.fp4_emulation`): an all-zero block has scale byte 0 in FlashInfer and 1.0 in ModelOpt; a
block whose scale underflows e4m3 is flushed to zero by FlashInfer and clamped to 2**-9 by ModelOpt; and
FlashInfer multiplies by a reciprocal where ModelOpt divides, so a value whose scaled magnitude lies within a
few float32 ulps of an e2m1 rounding boundary may take the neighbouring code.
"""

from __future__ import annotations

import pytest
import torch
from nvfp4_ext.kernels.fp4_emulation import fp4_quantize_emulated
from nvfp4_ext.kernels.reference import apply_gated_activation

from nvfp4_ext.dispatch import LAYER_KINDS, select_backend
from nvfp4_ext.engines.common import nvfp4_linear_forward, nvfp4_moe_forward
from nvfp4_ext.format import E2M1_BOUNDS, unpack_uint4

nvfp4_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
NVFP4QTensor = nvfp4_tensor.NVFP4QTensor

BLOCK = 16


def modelopt_quantize(x: torch.Tensor, input_scale: torch.Tensor):
    """ModelOpt's activation quantization: (codes uint8 [..., K], e4m3 scales, scaled values float32)."""
    qtensor, scale, _ = NVFP4QTensor.quantize(x, BLOCK, weights_scaling_factor_2=input_scale)
    scaled = NVFP4QTensor.quantize(x, BLOCK, weights_scaling_factor_2=input_scale, keep_high_precision=True)
    return unpack_uint4(qtensor._quantized_data), scale, scaled.float()


def modelopt_fake_quant(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt quantize -> dequantize of activations (float32)."""
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(x, BLOCK, weights_scaling_factor_2=input_scale)
    return qtensor.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK})


def modelopt_weight(w: torch.Tensor):
    """A weight quantized by ModelOpt: (packed uint8, e4m3 scales, global multiplier, dequantized fp32)."""
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(w, BLOCK)
    deq = qtensor.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK})
    return qtensor._quantized_data, scale, scale_2.float(), deq


def _activations(dtype: torch.dtype, seed: int, rows: int = 64, cols: int = 512) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, 1, generator=gen) * 4)
    x[3, :BLOCK] = 0  # an all-zero block
    x[5, BLOCK : 2 * BLOCK] *= 40  # above the calibrated range: block scale and codes saturate
    return x.to(dtype)


def _near_boundary(scaled: torch.Tensor, ulps: int = 4) -> torch.Tensor:
    """Whether |scaled| lies within `ulps` float32 ulps of an e2m1 rounding boundary."""
    magnitude = scaled.abs().unsqueeze(-1)
    bounds = E2M1_BOUNDS.to(scaled.device)
    return ((magnitude - bounds).abs() <= ulps * torch.finfo(torch.float32).eps * bounds).any(-1)


# ---------------------------------------------------------------------------- activation quantization
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_activation_quantization_matches_modelopt(dtype, seed):
    x = _activations(dtype, seed)
    input_scale = torch.tensor(3.0 / 2688)  # calibrated amax 3.0, as ModelOpt exports it: amax / (6 * 448)
    codes, scales = fp4_quantize_emulated(x, input_scale)
    mo_codes, mo_scales, mo_scaled = modelopt_quantize(x, input_scale)

    zero_block = x.float().reshape(x.shape[0], -1, BLOCK).abs().amax(-1) == 0
    ours_bytes, mo_bytes = scales.view(torch.uint8), mo_scales.view(torch.uint8)
    assert torch.equal(ours_bytes[~zero_block], mo_bytes[~zero_block])  # bit-exact scales
    assert (ours_bytes[zero_block] == 0).all() and (mo_scales[zero_block].float() == 1.0).all()
    assert mo_bytes.max() == 0x7E and ours_bytes.max() == 0x7E  # both saturate the scale at 448

    differ = codes != mo_codes
    # Bit-exact codes except a value on (within float32 rounding of) an e2m1 rounding boundary, where the
    # two operation orders land on the two sides of the tie: then the codes are neighbours.
    assert _near_boundary(mo_scaled[differ]).all(), mo_scaled[differ]
    assert (((codes[differ] & 7).int() - (mo_codes[differ] & 7).int()).abs() == 1).all()
    assert torch.equal(codes[differ] >> 3, mo_codes[differ] >> 3)  # same sign
    assert differ.sum() <= differ.numel() // 1000, int(differ.sum())  # ties of bf16/fp16 inputs
    if dtype == torch.float32:
        assert not differ.any()  # random fp32 data never sits on a tie
    assert (codes[5, BLOCK : 2 * BLOCK] & 7).max() == 7  # saturated at 6


def test_exact_ties_round_to_even_like_modelopt():
    # Power-of-two scales make every step exact in both computations: ties must round to the even code.
    input_scale = torch.tensor(2.0**-8)
    block = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 0, 0.5, 1, 2, 4])
    x = (block * 2.0**-8 * 1.0).reshape(1, BLOCK)  # block scale 1.0 (amax 6 * input_scale)
    codes, scales = fp4_quantize_emulated(x, input_scale)
    mo_codes, mo_scales, _ = modelopt_quantize(x, input_scale)
    assert scales.float().item() == 1.0 == mo_scales.float().item()
    assert torch.equal(codes, mo_codes)
    assert codes[0, 1:8].tolist() == [0, 2, 2, 4, 4, 6, 6]  # 0.25->0, 0.75->1, 1.25->1, 1.75->2, ...


def test_underflowing_block_flushes_to_zero_where_modelopt_clamps():
    input_scale = torch.tensor(1.0)
    x = torch.full((1, BLOCK), 6 * 2.0**-11)  # block scale 2**-11: below e4m3's smallest subnormal / 2
    codes, scales = fp4_quantize_emulated(x, input_scale)
    mo_codes, mo_scales, _ = modelopt_quantize(x, input_scale)
    assert scales.view(torch.uint8).item() == 0 and (codes == 0).all()  # FlashInfer: 0 scale, 0 codes
    assert mo_scales.float().item() == 2.0**-9  # ModelOpt: clamped scale, nonzero codes
    assert (mo_codes == 3).all()  # 6 * 2**-11 / 2**-9 = 1.5


# ----------------------------------------------------------------------------------------- GEMM / MoE
def _w4a4_tolerance(x_fq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float32 rounding of a K-term dot product, scaled by the magnitudes summed."""
    return 8 * x_fq.shape[-1] * torch.finfo(torch.float32).eps * (x_fq.abs() @ w.abs().t()) + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_forward_equals_modelopt_fake_quant_gemm(dtype, monkeypatch):
    monkeypatch.setenv("NVFP4_EXT_BACKEND", "emulated")
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen) * 0.05
    packed, w_scale, w_global, w_deq = modelopt_weight(w)
    x = (torch.randn(2, 7, 256, generator=gen) * 2).to(dtype)
    bias = torch.randn(48, generator=gen)
    input_scale = torch.tensor(4.0 / 2688)
    backend = select_backend("nvfp4_linear", None)
    assert backend == "emulated"
    out = nvfp4_linear_forward(
        x, packed, w_scale, w_global.expand(48), bias, backend, input_global=input_scale
    )
    assert out.shape == (2, 7, 48) and out.dtype == dtype
    x_fq = modelopt_fake_quant(x.reshape(-1, 256), input_scale)
    expected = x_fq @ w_deq.t() + bias
    tol = _w4a4_tolerance(x_fq, w_deq) + bias.abs() * 1e-7
    if dtype == torch.bfloat16:  # the GEMM output and the result are rounded to bf16, like mm_fp4's
        tol = tol + 2 * 2.0**-8 * expected.abs()
    assert ((out.reshape(-1, 48).float() - expected).abs() <= tol).all()
    # The activation quantization is really applied: the weight-only result differs.
    weight_only = x.reshape(-1, 256).float() @ w_deq.t() + bias
    assert (weight_only - expected).abs().max() > 10 * tol.max()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_moe_forward_equals_per_expert_modelopt_fake_quant(activation):
    gen = torch.Generator().manual_seed(4)
    experts, hidden, inter, tokens, top_k = 4, 64, 32, 9, 2
    w13 = [modelopt_weight(torch.randn(2 * inter, hidden, generator=gen) * 0.1) for _ in range(experts)]
    w2 = [modelopt_weight(torch.randn(hidden, inter, generator=gen) * 0.1) for _ in range(experts)]
    x = torch.randn(tokens, hidden, generator=gen)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    in13 = torch.rand(experts, generator=gen) * 1e-3 + 5e-4
    in2 = torch.rand(experts, generator=gen) * 1e-4 + 5e-5

    out = nvfp4_moe_forward(
        x,
        torch.stack([w[0] for w in w13]),
        torch.stack([w[1] for w in w13]),
        torch.stack([w[2].expand(2 * inter) for w in w13]),
        torch.stack([w[0] for w in w2]),
        torch.stack([w[1] for w in w2]),
        torch.stack([w[2].expand(hidden) for w in w2]),
        topk_weights,
        topk_ids,
        activation,
        "emulated",
        in13,
        in2,
    )
    expected = torch.zeros(tokens, hidden)
    tol = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            e = int(topk_ids[t, j])
            x_fq = modelopt_fake_quant(x[t : t + 1], in13[e])
            gate_up = x_fq @ w13[e][3].t()
            h = apply_gated_activation(gate_up[:, :inter], gate_up[:, inter:], activation)
            h_fq = modelopt_fake_quant(h, in2[e])
            expected[t] += topk_weights[t, j] * (h_fq @ w2[e][3].t())[0]
            tol[t] += topk_weights[t, j] * _w4a4_tolerance(h_fq, w2[e][3])[0]
    # A gate/up rounding difference can move h across an e2m1 boundary: allow one code step of h there.
    step = (in2.max() * 448 * 6 / 4) * w2[0][3].abs().max() * topk_weights.sum(-1, keepdim=True)
    diff = (out - expected).abs()
    assert (diff <= tol + step).all()
    assert (diff <= tol).float().mean() > 0.95  # almost everywhere bit-for-bit up to float32 summation


def test_emulated_selection():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVFP4_EXT_BACKEND", "emulated")
        for capability in (None, (9, 0), (10, 0)):
            chosen = {kind: select_backend(kind, capability, has_flashinfer=True) for kind in LAYER_KINDS}
            assert chosen == {
                "nvfp4_linear": "emulated",
                "nvfp4_moe": "emulated",
                "nvfp4_w4a16_linear": "torch",
                "nvfp4_w4a16_moe": "torch",
                "fp8_linear": "torch",
            }


def test_emulated_linear_without_input_scale_is_a_clear_error():
    from nvfp4_ext.errors import ConfigError

    packed, w_scale, w_global, _ = modelopt_weight(torch.randn(16, 32))
    with pytest.raises(ConfigError, match="input_scale"):
        nvfp4_linear_forward(torch.randn(2, 32), packed, w_scale, w_global.expand(16), None, "emulated")


def test_emulated_ops_have_no_data_dependent_shapes():
    """CUDA-graph proxy: both emulated ops run under FakeTensorMode (no .item(), nonzero, bincount)."""
    from torch._subclasses import FakeTensorMode

    packed, w_scale, w_global, _ = modelopt_weight(torch.randn(32, 64))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        x = mode.from_tensor(torch.randn(5, 64))
        out = nvfp4_linear_forward(
            x, packed, w_scale, w_global.expand(32), None, "emulated", input_global=torch.tensor(1e-3)
        )
        assert out.shape == (5, 32)
        moe = nvfp4_moe_forward(
            x,
            packed.reshape(1, 32, 32).expand(2, 32, 32),
            w_scale.reshape(1, 32, 4).expand(2, 32, 4),
            torch.ones(2, 32),
            torch.zeros(2, 64, 8, dtype=torch.uint8),
            torch.ones(2, 64, 1).to(torch.float8_e4m3fn),
            torch.ones(2, 64),
            torch.ones(5, 1),
            torch.zeros(5, 1, dtype=torch.long),
            "silu",
            "emulated",
            torch.full((2,), 1e-3),
            torch.full((2,), 1e-3),
        )
        assert moe.shape == (5, 64)
