"""The pure-torch kernel references and the op dispatch (CPU, no Triton needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from nvfp4_ext.kernels import fp8_gemm, fp8_gemm_ref, nvfp4_gemm, nvfp4_gemm_ref, nvfp4_moe_ref

from nvfp4_ext.format import dequantize_nvfp4, quantize_fp8, quantize_nvfp4
from tolerances import assert_within_rounding, linear_terms, moe_terms


def _dense_moe(x, w13, w2, topk_weights, topk_ids, activation):
    """Token-by-token MoE over dense float weights: the definition the reference must reproduce."""
    intermediate = w13.shape[1] // 2
    act = {
        "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
        "silu": torch.nn.functional.silu,
    }
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = w13[e].double() @ x[t].double()
            hidden = act[activation](gate_up[:intermediate]) * gate_up[intermediate:]
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ hidden)
    return out


def test_nvfp4_gemm_ref_matches_dense_matmul_of_dequantized_weight():
    torch.manual_seed(0)
    x, w, bias = torch.randn(3, 64), torch.randn(48, 64), torch.randn(48)
    q = quantize_nvfp4(w)
    expected = x.double() @ q.dequantize().double().t() + bias.double()
    y = nvfp4_gemm_ref(x, q.qdata, q.scale, q.global_scale, bias)
    assert_within_rounding(y, expected, linear_terms(x, q.dequantize()) + bias.double().abs())
    # Quantization error of 4-bit weights stays bounded relative to the unquantized product.
    rel = (y - (x @ w.t() + bias)).norm() / (x @ w.t()).norm()
    assert 0.01 < rel < 0.2


def test_nvfp4_gemm_ref_keeps_per_row_global_scales_of_fused_shards():
    torch.manual_seed(1)
    q_shard, k_shard = quantize_nvfp4(torch.randn(32, 64)), quantize_nvfp4(10 * torch.randn(16, 64))
    weight = torch.cat([q_shard.qdata, k_shard.qdata])
    scale = torch.cat([q_shard.scale, k_shard.scale])
    per_row = torch.cat([q_shard.global_scale.expand(32), k_shard.global_scale.expand(16)])
    x = torch.randn(2, 64)
    y = nvfp4_gemm_ref(x, weight, scale, per_row)
    for rows, shard in ((slice(0, 32), q_shard), (slice(32, 48), k_shard)):
        w = shard.dequantize()
        assert_within_rounding(y[:, rows], x @ w.t(), linear_terms(x, w))


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("per_row_global", [False, True])
def test_nvfp4_moe_ref_matches_token_by_token_definition(activation, per_row_global):
    torch.manual_seed(2)
    experts, hidden, intermediate, tokens, top_k = 6, 64, 32, 5, 2
    q13 = quantize_nvfp4(torch.randn(experts, 2 * intermediate, hidden))
    q2 = quantize_nvfp4(torch.randn(experts, hidden, intermediate))
    g13, g2 = q13.global_scale, q2.global_scale
    if per_row_global:
        g13 = g13[:, None] * torch.linspace(0.5, 2.0, 2 * intermediate)
        g2 = g2[:, None] * torch.linspace(0.5, 2.0, hidden)
    x = torch.randn(tokens, hidden)
    topk_ids = torch.tensor([[0, 3], [3, 1], [0, 0], [5, 3], [1, 0]])  # experts 2 and 4 get nothing
    topk_weights = torch.rand(tokens, top_k)
    out = nvfp4_moe_ref(
        x, q13.qdata, q13.scale, g13, q2.qdata, q2.scale, g2, topk_weights, topk_ids, activation
    )
    w13 = dequantize_nvfp4(q13.qdata, q13.scale, g13)
    w2 = dequantize_nvfp4(q2.qdata, q2.scale, g2)
    expected = _dense_moe(x, w13, w2, topk_weights, topk_ids, activation)
    assert_within_rounding(out, expected, moe_terms(x, w13, w2, topk_weights, topk_ids))


def test_nvfp4_moe_ref_rejects_unknown_activation():
    q = quantize_nvfp4(torch.randn(1, 32, 16))
    q2 = quantize_nvfp4(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match="activation"):
        nvfp4_moe_ref(
            torch.randn(1, 16),
            q.qdata,
            q.scale,
            q.global_scale,
            q2.qdata,
            q2.scale,
            q2.global_scale,
            torch.ones(1, 1),
            torch.zeros(1, 1, dtype=torch.long),
            "relu",
        )


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_fp8_gemm_ref_and_scaled_mm_path(granularity):
    torch.manual_seed(3)
    x, w = torch.randn(4, 144), torch.randn(160, 144)
    q, scale = quantize_fp8(w, granularity)
    y = fp8_gemm_ref(x, q, scale)
    rel = (y - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < 0.05  # e4m3 keeps 3 mantissa bits: ~2-3% relative weight error
    # The W8A8 `_scaled_mm` path also quantizes activations: close to, not equal to, the W8A16 reference.
    y8 = fp8_gemm(x, q, scale, backend="scaled_mm")
    assert (y8 - y).norm() / y.norm() < 0.06


def test_ops_auto_on_cpu_runs_the_reference_exactly():
    torch.manual_seed(4)
    x = torch.randn(3, 32, dtype=torch.float16)
    q = quantize_nvfp4(torch.randn(16, 32))
    assert torch.equal(
        nvfp4_gemm(x, q.qdata, q.scale, q.global_scale), nvfp4_gemm_ref(x, q.qdata, q.scale, q.global_scale)
    )
    assert nvfp4_gemm(x, q.qdata, q.scale, q.global_scale).dtype == torch.float16


def test_ops_reject_bad_backend_names():
    q = quantize_nvfp4(torch.randn(16, 32))
    with pytest.raises(ValueError, match="expected backend"):
        nvfp4_gemm(torch.randn(1, 32), q.qdata, q.scale, q.global_scale, backend="cuda")


def test_kernels_package_imports_without_triton_and_triton_backend_explains_itself():
    code = (
        "import sys, torch\n"
        "import nvfp4_ext.kernels as k\n"
        "assert 'triton' not in sys.modules\n"
        "from nvfp4_ext.format import quantize_nvfp4\n"
        "q = quantize_nvfp4(torch.randn(16, 32))\n"
        "try:\n"
        "    k.nvfp4_gemm(torch.randn(1, 32), q.qdata, q.scale, q.global_scale, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_custom_ops_trace_under_fullgraph_compile_and_pass_opcheck():
    torch.manual_seed(5)
    x = torch.randn(3, 64)
    q = quantize_nvfp4(torch.randn(48, 64))
    gemm_args = (x, q.qdata, q.scale, q.global_scale, None, "auto")
    compiled = torch.compile(
        lambda *a: torch.ops.nvfp4_ext.nvfp4_gemm(*a) * 2, fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(compiled(*gemm_args), 2 * nvfp4_gemm_ref(x, q.qdata, q.scale, q.global_scale))
    q13, q2 = quantize_nvfp4(torch.randn(4, 32, 64)), quantize_nvfp4(torch.randn(4, 64, 16))
    topk_ids = torch.tensor([[0, 1], [1, 2], [3, 3]])
    moe_args = (
        x,
        q13.qdata,
        q13.scale,
        q13.global_scale,
        q2.qdata,
        q2.scale,
        q2.global_scale,
        torch.rand(3, 2),
        topk_ids,
        "silu",
        "auto",
    )
    w8, s8 = quantize_fp8(torch.randn(48, 64), "channel")
    # The schema test would compare fp8 tensors, which CPU torch cannot multiply; the rest applies.
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.nvfp4_ext.nvfp4_gemm.default, gemm_args, test_utils=checks)
    torch.library.opcheck(torch.ops.nvfp4_ext.nvfp4_moe.default, moe_args, test_utils=checks)
    torch.library.opcheck(torch.ops.nvfp4_ext.fp8_gemm.default, (x, w8, s8, None, "auto"), test_utils=checks)
