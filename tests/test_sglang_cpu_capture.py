"""SGLang's NVFP4 methods decide and lay out everything at load and keep compiled graphs out of our launchers.

Runs inside the SGLang subprocess of tests/test_sglang_isolated.py (like the other test_sglang_cpu_* files),
against SGLang 0.5.23's real base classes:
  * the linear forward is the opaque `torch.ops.nvfp4_ext.nvfp4_linear` (what `--enable-torch-compile`
    traces is that op, not the Triton launcher or the reference's dequantization);
  * `backend_for` runs at load, not per forward; a FlashInfer layer is padded and swizzled once;
  * the MoE logs the backend it runs (our Triton kernels where FlashInfer would have been chosen).
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("NVFP4_EXT_SGLANG_CHILD") != "1":
    pytest.skip("runs in the SGLang subprocess of test_sglang_isolated.py", allow_module_level=True)

from nvfp4_ext.engines.sglang.cpu_support import prepare_cpu_import  # noqa: E402

prepare_cpu_import()
pytest.importorskip("sglang")

import nvfp4_ext.engines.common as common  # noqa: E402
from nvfp4_ext.format import dequantize_nvfp4, quantize_nvfp4  # noqa: E402

pytestmark = pytest.mark.sglang


def _config():
    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig

    return Nvfp4ExtConfig.from_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})


def _linear(n: int, k: int, scheme: str = "nvfp4"):
    """An SGLang NVFP4 linear layer (our method on SGLang's parameter classes), loaded and processed."""
    from nvfp4_ext.engines.sglang.linear import Nvfp4ExtLinearMethod

    q = quantize_nvfp4(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))
    method = Nvfp4ExtLinearMethod(_config(), scheme, "blk.mlp.down_proj")
    layer = torch.nn.Module()
    method.create_weights(layer, k, [n], k, n, torch.float32, weight_loader=None)
    layer.weight.data.copy_(q.qdata)
    layer.weight_scale.data.copy_(q.scale)
    layer.weight_scale_2.data.fill_(float(q.global_scale))
    layer.input_scale.data.fill_(0.02)
    method.process_weights_after_loading(layer)
    return method, layer, q


def test_linear_forward_is_the_opaque_op_under_torch_compile():
    """On main the compiled graph held the reference's dequantization (the launcher was traced)."""
    method, layer, q = _linear(48, 64, "nvfp4_w4a16")
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: method.apply(layer, x), backend=record, fullgraph=True)
    x = torch.randn(3, 64)
    out = compiled(x)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.nvfp4_ext.nvfp4_linear], targets  # nothing inside the op is traced
    expected = x @ dequantize_nvfp4(q.qdata, q.scale, q.global_scale).t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_backend_is_chosen_at_load_not_per_forward(monkeypatch):
    import nvfp4_ext.engines.sglang.linear as sglang_linear
    import nvfp4_ext.engines.sglang.moe as sglang_moe

    calls = []
    for module in (sglang_linear, sglang_moe):
        original = module.backend_for
        monkeypatch.setattr(
            module, "backend_for", lambda *a, _f=original, **kw: calls.append(a[0]) or _f(*a, **kw)
        )
    method, layer, _ = _linear(48, 64)
    assert calls == ["nvfp4_linear"] and layer.nvfp4_backend == "torch"
    for _ in range(3):
        method.apply(layer, torch.randn(2, 64))
    assert calls == ["nvfp4_linear"]  # on main: one more per forward


def test_flashinfer_layer_is_padded_and_swizzled_once_at_load(monkeypatch):
    """A W4A4 layer of 528 = 16 * 33 outputs and inputs on the FlashInfer backend (sm >= 100): padded to
    CUTLASS's multiples of 32 and swizzled at load; forwards swizzle nothing and return the unpadded
    product (FlashInfer replaced by the torch model of tests/test_blackwell_paths.py)."""
    import sys
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    from test_blackwell_paths import FlashinferFp4Model, _expected_w4a4

    monkeypatch.setattr(common, "select_backend", lambda kind, capability: "flashinfer")
    monkeypatch.setattr(common, "BACKENDS_USED", {})
    swizzles = []
    original = common.swizzle_block_scales
    monkeypatch.setattr(common, "swizzle_block_scales", lambda s: swizzles.append(s.shape) or original(s))
    method, layer, q = _linear(528, 528)
    assert layer.nvfp4_backend == "flashinfer" and layer.weight.shape == (544, 272) and len(swizzles) == 1
    model = FlashinferFp4Model()
    module = ModuleType("flashinfer")
    module.__spec__ = ModuleSpec("flashinfer", None)
    module.fp4_quantize, module.mm_fp4 = model.fp4_quantize, model.mm_fp4
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    x = torch.randn(3, 528)
    for _ in range(2):
        out = method.apply(layer, x)
    assert len(swizzles) == 1 and model.calls.count("mm_fp4") == 2
    row_global, input_global = q.global_scale.expand(528), torch.tensor(0.02)
    expected, magnitude = _expected_w4a4(x, q, row_global, input_global, torch.zeros(528))
    assert ((out.double() - expected).abs() <= 2**-7 * (magnitude + expected.abs()) + 1e-6).all()


def test_moe_logs_the_triton_kernels_it_runs_where_flashinfer_would_be_chosen(monkeypatch, caplog):
    """On main the MoE logged "flashinfer" (per call, via backend_for) while running our Triton kernels."""
    from nvfp4_ext.engines.sglang.moe import Nvfp4ExtMoEMethod

    monkeypatch.setattr(common, "select_backend", lambda kind, capability: "flashinfer")
    monkeypatch.setattr(common, "BACKENDS_USED", {})
    experts, hidden, inter = 2, 32, 32
    layer = torch.nn.Module()
    method = Nvfp4ExtMoEMethod(_config(), "nvfp4", "blk.experts")
    method.create_weights(layer, experts, hidden, inter, torch.float32)
    runner_config = SimpleNamespace(activation="silu", is_gated=True, routed_scaling_factor=None)
    method.create_moe_runner(layer, runner_config)
    for name, param in layer.named_parameters():
        if "scale" in name:
            param.data.fill_(1.0)
    with caplog.at_level(logging.INFO, logger="nvfp4_ext"):
        method.process_weights_after_loading(layer)
    assert layer.nvfp4_backend == "triton"
    assert layer.nvfp4_w2_global.shape == (experts, hidden)  # per row at load, no per-call expansion
    messages = [r.getMessage() for r in caplog.records]
    assert any("nvfp4_moe layers run on the triton backend" in m for m in messages), messages
    assert not any("on the flashinfer backend" in m for m in messages), messages
