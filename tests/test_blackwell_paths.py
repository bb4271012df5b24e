"""Blackwell-only forward paths, proven on CPU: FlashInfer W4A4 padding (sm >= 100), the FP8 choice on sm_12x.

FlashInfer's kernels need a GPU, so `FlashinferFp4Model` stands in for `flashinfer.fp4_quantize` /
`flashinfer.mm_fp4` with what they compute (NVFP4 quantization of the activations with 128x4-swizzled
block scales; a block-scaled FP4 GEMM that, like CUTLASS, refuses K or N not multiple of 32). The layouts
it reads are decoded with CUTLASS's index formula, not with our swizzle. The real kernels run in the
`gpu`-marked test at the end.
"""

from __future__ import annotations

import functools
import logging
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

import pytest
import torch
from nvfp4_ext.kernels.ops import fp8_path, scaled_mm_unsupported

from nvfp4_ext.format import dequantize_nvfp4, fake_quantize_nvfp4, quantize_fp8, quantize_nvfp4


# ----------------------------------------------------------------------------------- FlashInfer model
def _sf_offset(rows: torch.Tensor, cols: torch.Tensor, padded_cols: int) -> torch.Tensor:
    """Offset of scale (r, c) in CUTLASS's 128x4 layout: 128-row x 4-column tiles, each stored as
    32 x (4 x 4) (row r % 32, then row group r % 128 // 32, then column c % 4)."""
    tile = (rows // 128) * 128 * padded_cols + (cols // 4) * 512
    return tile + (rows % 32) * 16 + (rows % 128 // 32) * 4 + cols % 4


def _swizzle(scale: torch.Tensor) -> torch.Tensor:
    rows, cols = scale.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    flat = torch.zeros(padded_rows * padded_cols, dtype=torch.uint8)
    flat[_sf_offset(r, c, padded_cols).reshape(-1)] = scale.view(torch.uint8).reshape(-1)
    return flat.reshape(padded_rows, padded_cols).view(torch.float8_e4m3fn)


def _unswizzle(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    flat = swizzled.contiguous().view(torch.uint8).reshape(-1)
    return flat[_sf_offset(r, c, swizzled.shape[1])].view(torch.float8_e4m3fn)


class FlashinferFp4Model:
    """What `flashinfer.fp4_quantize` and `flashinfer.mm_fp4(backend="cutlass")` compute, in torch."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fp4_quantize(self, x: torch.Tensor, global_scale: torch.Tensor):
        self.calls.append("fp4_quantize")
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise NotImplementedError(f"fp4_quantize takes fp16/bf16 input, got {x.dtype}")
        # flashinfer's global_scale divides (448 * 6 / amax); ours is the multiplier.
        q = quantize_nvfp4(x.float(), global_scale=(1.0 / global_scale.double()).float().reshape(()))
        return q.qdata, _swizzle(q.scale)

    def mm_fp4(self, a, b, a_descale, b_descale, alpha, out_dtype, backend="auto"):
        self.calls.append("mm_fp4")
        m, k = a.shape[0], a.shape[1] * 2
        n = b.shape[1]
        if k % 32 or n % 32:
            raise ValueError(f"CUTLASS FP4 GEMM needs K and N multiples of 32, got K={k}, N={n}")
        assert b.t().is_contiguous() and a_descale.shape[1] == b_descale.shape[0]
        one = torch.tensor(1.0)
        a_vals = dequantize_nvfp4(a, _unswizzle(a_descale, m, k // 16), one)
        b_vals = dequantize_nvfp4(b.t(), _unswizzle(b_descale.t(), n, k // 16), one)
        return (alpha.double() * (a_vals.double() @ b_vals.double().t())).to(out_dtype)


@pytest.fixture
def flashinfer_model(monkeypatch):
    """Installs the model as the `flashinfer` module; call `.install()` after importing an engine (vLLM
    probes for FlashInfer at import)."""
    model = FlashinferFp4Model()
    module = ModuleType("flashinfer")
    module.__spec__ = ModuleSpec("flashinfer", None)
    module.fp4_quantize, module.mm_fp4 = model.fp4_quantize, model.mm_fp4
    model.install = lambda: monkeypatch.setitem(sys.modules, "flashinfer", module)
    return model


def test_swizzle_model_agrees_with_ours_so_the_model_reads_what_we_write():
    from nvfp4_ext.engines.common import swizzle_block_scales

    scale = torch.rand(200, 37).to(torch.float8_e4m3fn)
    assert torch.equal(_swizzle(scale).view(torch.uint8), swizzle_block_scales(scale).view(torch.uint8))
    assert torch.equal(_unswizzle(_swizzle(scale), 200, 37).view(torch.uint8), scale.view(torch.uint8))


def _w4a4_layer(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = quantize_nvfp4(torch.randn(n, k, generator=g) * torch.logspace(-2, 1, k))
    global_per_row = q.global_scale * torch.linspace(0.5, 2.0, n)  # fused shards keep their own
    input_global = torch.tensor(0.02)
    return q, global_per_row, input_global


def _expected_w4a4(x, q, global_per_row, input_global, bias):
    """The unpadded W4A4 product: activations (float32 ones rounded to bf16 first, as fp4_quantize needs)
    quantized with the static input scale, fp64 math."""
    x = x.to(torch.bfloat16) if x.dtype == torch.float32 else x
    xq = fake_quantize_nvfp4(x.float(), input_global).double()
    w = dequantize_nvfp4(q.qdata, q.scale, global_per_row).double()
    return xq @ w.t() + bias.double(), xq.abs() @ w.abs().t()


@pytest.mark.parametrize(
    ("n", "k", "dtype"),
    [
        (528, 256, torch.bfloat16),
        (96, 528, torch.float16),
        (528, 528, torch.float32),
        (256, 128, torch.bfloat16),
    ],
    ids=["N=528", "K=528", "both-fp32", "aligned"],
)
def test_flashinfer_w4a4_pads_at_load_and_slices_to_the_unpadded_product(flashinfer_model, n, k, dtype):
    """DiffusionGemma's expert width 2112 at TP=4 gives 528 = 16 * 33: on main the GEMM refused it, and
    float32 activations reached fp4_quantize."""
    from nvfp4_ext.engines.common import (
        flashinfer_input_scale_inverse,
        flashinfer_nvfp4_weights,
        nvfp4_linear_forward,
    )

    flashinfer_model.install()
    q, global_per_row, input_global = _w4a4_layer(n, k)
    weight, swizzled = flashinfer_nvfp4_weights(q.qdata, q.scale)
    assert weight.shape == (-(-n // 32) * 32, -(-k // 32) * 16)
    inverse = flashinfer_input_scale_inverse(input_global)
    x = torch.randn(2, 3, k).to(dtype)
    bias = torch.randn(n)
    out = nvfp4_linear_forward(
        x, weight, q.scale, global_per_row, bias, "flashinfer",
        input_global=input_global, weight_scale_swizzled=swizzled, input_global_inv=inverse,
    )
    assert out.shape == (2, 3, n) and out.dtype == dtype
    expected, magnitude = _expected_w4a4(x.reshape(6, k), q, global_per_row, input_global, bias)
    # bf16 GEMM output (2**-8), then the output dtype's rounding.
    error = (out.reshape(6, n).double() - expected).abs()
    assert (error <= 2**-7 * magnitude + 2**-7 * expected.abs() + 1e-6).all(), error.max()
    assert flashinfer_model.calls == ["fp4_quantize", "mm_fp4"]


def test_vllm_w4a4_layer_prepares_once_at_load_and_runs_flashinfer_padded(flashinfer_model, monkeypatch):
    """vLLM's NVFP4 linear with the FlashInfer backend: padding, swizzle and the reciprocal input scale at
    load; the forward through the opaque op gives the unpadded product."""
    pytest.importorskip("vllm")
    import vllm.model_executor.parameter as vllm_parameter

    import nvfp4_ext.engines.common as common
    from nvfp4_ext.engines.vllm.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.vllm.linear import Nvfp4ExtLinearMethod

    # A single-rank layer without initialising torch.distributed in this process.
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(common, "select_backend", lambda kind, capability: "flashinfer")
    monkeypatch.setattr(common, "BACKENDS_USED", {})
    n, k = 528, 528
    q, _, input_global = _w4a4_layer(n, k)
    config = Nvfp4ExtConfig.from_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})
    method = Nvfp4ExtLinearMethod(config, "nvfp4", "layers.0.mlp.down_proj")
    layer = torch.nn.Module()
    method.create_weights(layer, k, [n], k, n, torch.float32, weight_loader=lambda *a, **kw: None)
    layer.weight.data.copy_(q.qdata)
    layer.weight_scale.data.copy_(q.scale)
    layer.weight_scale_2.data.fill_(float(q.global_scale))
    layer.input_scale.data.fill_(float(input_global))
    method.process_weights_after_loading(layer)
    assert method.backend == "flashinfer" and layer.weight.shape == (544, 272)
    assert torch.equal(layer.nvfp4_input_global_inv, torch.tensor([50.0]))
    x = torch.randn(3, k)
    flashinfer_model.install()
    out = method.apply(layer, x)
    expected, magnitude = _expected_w4a4(x, q, q.global_scale.expand(n), input_global, torch.zeros(n))
    assert out.shape == (3, n) and out.dtype == torch.float32
    assert ((out.double() - expected).abs() <= 2**-7 * (magnitude + expected.abs()) + 1e-6).all()


@pytest.mark.gpu
def test_flashinfer_w4a4_on_a_blackwell_gpu_equals_the_unpadded_product():
    """The real FlashInfer kernels at an unaligned width (sm >= 100 with flashinfer installed), eager and
    replayed from a CUDA graph."""
    if torch.cuda.get_device_capability() < (10, 0):
        pytest.skip("FlashInfer FP4 GEMMs need sm >= 100")
    pytest.importorskip("flashinfer")
    from test_kernels_gpu import _replay_matches_eager

    from nvfp4_ext.engines.common import (
        flashinfer_input_scale_inverse,
        flashinfer_nvfp4_weights,
        nvfp4_linear_forward,
    )

    for n, k in ((528, 2816), (2816, 528)):
        q, global_per_row, input_global = _w4a4_layer(n, k)
        q = type(q)(q.qdata.cuda(), q.scale.cuda(), q.global_scale.cuda())
        global_per_row, input_global = global_per_row.cuda(), input_global.cuda()
        weight, swizzled = flashinfer_nvfp4_weights(q.qdata, q.scale)
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda")
        forward = functools.partial(
            nvfp4_linear_forward, x, weight, q.scale, global_per_row, bias, "flashinfer",
            input_global=input_global, weight_scale_swizzled=swizzled,
            input_global_inv=flashinfer_input_scale_inverse(input_global),
        )
        expected, _ = _expected_w4a4(x, q, global_per_row, input_global, bias)
        rel = float((forward().double() - expected).norm() / expected.norm())
        assert rel < 1e-2, rel  # bf16 output; FlashInfer's activation rounding may differ in ties
        _replay_matches_eager(forward, functools.partial(x.copy_, torch.randn_like(x)))


# ------------------------------------------------------------------------------ FP8 on consumer Blackwell
@pytest.mark.parametrize(
    ("capability", "granularity", "expected"),
    [
        ((8, 0), "channel", "triton"),  # no FP8 tensor cores
        ((8, 9), "channel", "scaled_mm"),
        ((9, 0), "tensor", "scaled_mm"),
        ((10, 0), "channel", "scaled_mm"),
        ((12, 0), "channel", "triton"),  # RTX 50xx / RTX PRO 6000: no row-wise _scaled_mm (pytorch#192707)
        ((12, 1), "channel", "triton"),
        ((12, 0), "tensor", "scaled_mm"),  # tensor-wise scaling works there
        ((9, 0), "block", "triton"),
        (None, "channel", "torch"),
    ],
)
def test_fp8_linears_choose_scaled_mm_by_capability(capability, granularity, expected):
    weight, scale = quantize_fp8(torch.randn(256, 256), granularity)  # 2x2 blocks of 128
    scale = scale.reshape(-1) if granularity == "channel" else scale
    assert fp8_path(capability, weight.shape, scale) == expected


def test_fp8_fallback_on_sm120_is_logged_once(caplog, monkeypatch):
    from nvfp4_ext.kernels import ops

    monkeypatch.setattr(ops, "_LOGGED", set())
    weight, scale = quantize_fp8(torch.randn(64, 128), "channel")
    with caplog.at_level(logging.INFO, logger="nvfp4_ext"):
        for _ in range(3):
            assert fp8_path((12, 0), weight.shape, scale.reshape(-1)) == "triton"
    messages = [r.getMessage() for r in caplog.records if "W8A16 Triton" in r.getMessage()]
    assert len(messages) == 1, messages
    assert scaled_mm_unsupported((12, 0), weight.shape, scale.reshape(-1)).endswith("pytorch#192707)")
