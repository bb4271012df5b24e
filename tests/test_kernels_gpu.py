"""Kernels on a real GPU against the references, including the opt-in PTX decode (`-m gpu`, skipped on CPU).

Run on a GPU machine: `pytest -m gpu tests/test_kernels_gpu.py`. Tolerances as in the interpreter cases:
the operands are exact, so differences come from fp32 accumulation order and the bf16 output rounding.
"""

from __future__ import annotations

import pytest
import torch
from nvfp4_ext.kernels import fp8_gemm, fp8_gemm_ref, nvfp4_gemm, nvfp4_gemm_ref, nvfp4_moe, nvfp4_moe_ref

from nvfp4_ext.format import quantize_fp8, quantize_nvfp4

pytestmark = pytest.mark.gpu


def _close(actual, expected):
    rel = float((actual.double() - expected.double()).norm() / expected.double().norm())
    assert rel < 4e-3, rel  # bf16 output: 2**-8 relative per element at most


@pytest.fixture(params=["0", "1"], ids=["portable-decode", "marlin-ptx-decode"])
def fast_decode(request, monkeypatch):
    monkeypatch.setenv("NVFP4_EXT_MARLIN_DECODE", request.param)
    return request.param


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 2816, 2816), (16, 4224, 2816), (33, 1024, 2112), (256, 2048, 4096), (4, 262144 // 16, 2816)],
)
def test_nvfp4_gemm_on_gpu(fast_decode, m, n, k):
    torch.manual_seed(m + n)
    q = quantize_nvfp4(torch.randn(n, k, device="cuda") * torch.logspace(-3, 1, k, device="cuda"))
    g = q.global_scale * torch.linspace(0.5, 2.0, n, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    _close(
        nvfp4_gemm(x, q.qdata, q.scale, g, bias, backend="triton"),
        nvfp4_gemm_ref(x, q.qdata, q.scale, g, bias),
    )


@pytest.mark.parametrize(("tokens", "activation"), [(1, "gelu_tanh"), (32, "silu"), (300, "gelu_tanh")])
def test_nvfp4_moe_on_gpu(fast_decode, tokens, activation):
    torch.manual_seed(tokens)
    experts, hidden, inter, top_k = 128, 2816, 704, 8
    q13 = quantize_nvfp4(torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5)
    q2 = quantize_nvfp4(torch.randn(experts, hidden, inter, device="cuda") / inter**0.5)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    topk_weights, topk_ids = torch.softmax(torch.randn(tokens, experts, device="cuda"), -1).topk(top_k, -1)
    args = (
        x,
        q13.qdata,
        q13.scale,
        q13.global_scale,
        q2.qdata,
        q2.scale,
        q2.global_scale,
        topk_weights,
        topk_ids.to(torch.int32),
        activation,
    )
    _close(nvfp4_moe(*args, backend="triton"), nvfp4_moe_ref(*args))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_fp8_gemm_on_gpu(granularity):
    weight, scale = quantize_fp8(torch.randn(2816, 2816, device="cuda"), granularity)
    x = torch.randn(8, 2816, device="cuda", dtype=torch.bfloat16)
    _close(fp8_gemm(x, weight, scale, backend="triton"), fp8_gemm_ref(x, weight, scale))


# --------------------------------------------------------------------------------- CUDA-graph capture
def _capture(fn):
    """Warm up on a side stream (Triton compiles, caches fill), then capture one call of `fn`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _replay_matches_eager(fn, refill):
    """Capture `fn`, give its static inputs new values (`refill`), replay, and compare with an eager call
    on those values: whatever the graph baked in at capture (routing, sizes, host reads) would show."""
    graph, out = _capture(fn)
    refill()
    graph.replay()
    torch.cuda.synchronize()
    _close(out, fn())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("tokens", [1, 4, 300])
def test_nvfp4_moe_captures_in_a_cuda_graph(backend, tokens):
    """The alignment sized by shapes only, the router's ids read on the device: new routing after capture
    is served by the replay (on main, capture failed: bincount syncs)."""
    torch.manual_seed(tokens)
    experts, hidden, inter, top_k = 32, 512, 256, 4
    q13 = quantize_nvfp4(torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5)
    q2 = quantize_nvfp4(torch.randn(experts, hidden, inter, device="cuda") / inter**0.5)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    topk_weights = torch.rand(tokens, top_k, device="cuda")
    topk_ids = torch.randint(0, experts, (tokens, top_k), device="cuda", dtype=torch.int32)
    weights = (q13.qdata, q13.scale, q13.global_scale, q2.qdata, q2.scale, q2.global_scale)

    def fn():
        return nvfp4_moe(x, *weights, topk_weights, topk_ids, "gelu_tanh", backend=backend)

    def refill():
        x.copy_(torch.randn_like(x))
        topk_ids.copy_(torch.randint(0, experts, topk_ids.shape, device="cuda", dtype=torch.int32))
        topk_weights.copy_(torch.rand_like(topk_weights))

    _replay_matches_eager(fn, refill)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("m", [1, 64, 300])
def test_nvfp4_gemm_captures_in_a_cuda_graph(backend, m):
    q = quantize_nvfp4(torch.randn(1024, 2048, device="cuda"))
    g = q.global_scale * torch.linspace(0.5, 2.0, 1024, device="cuda")
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    _replay_matches_eager(
        lambda: nvfp4_gemm(x, q.qdata, q.scale, g, backend=backend), lambda: x.copy_(torch.randn_like(x))
    )


@pytest.mark.parametrize("backend", ["triton", "scaled_mm", "torch"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_fp8_gemm_captures_in_a_cuda_graph(backend, granularity):
    weight, scale = quantize_fp8(torch.randn(1024, 2048, device="cuda"), granularity)
    scale = scale.reshape(-1) if granularity == "channel" else scale
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    _replay_matches_eager(
        lambda: fp8_gemm(x, weight, scale, backend=backend), lambda: x.copy_(torch.randn_like(x))
    )

