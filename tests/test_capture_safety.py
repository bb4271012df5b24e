"""Every forward path an engine may capture in a CUDA graph runs under `FakeTensorMode` (CPU proxy).

vLLM captures MoE and linear layers (piecewise and full graphs), SGLang captures decode. During capture no
host code may read device values (`.item()`, `int(t)`, `torch.bincount`, `nonzero`, boolean indexing) and no
output shape may depend on them. Fake tensors carry no data, so such an op raises here
(`DynamicOutputShapeException` / `DataDependentOutputException`) exactly where capture would break. The
Triton launchers run their host code with the kernel launch replaced by a recorder (fake tensors have no
memory to launch on); `tests/test_kernels_gpu.py` captures and replays the real kernels on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from nvfp4_ext.kernels import fp8_gemm, nvfp4_gemm, nvfp4_moe
from nvfp4_ext.kernels.moe_align import moe_align_block_size
from torch._subclasses import FakeTensorMode

from nvfp4_ext.format import quantize_fp8, quantize_nvfp4

pytest.importorskip("triton")

EXPERTS, HIDDEN, INTER = 8, 64, 32


class _RecordedLaunch:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **meta)` records the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append((tuple(grid), args, meta))

        return launch


@pytest.fixture
def mode() -> FakeTensorMode:
    return FakeTensorMode()


@pytest.fixture
def fake(mode):
    """`fake(t)`: a fake tensor with t's shape, dtype and strides (no data); run the code under test
    inside `with mode:`."""
    return mode.from_tensor


def _moe_weights(experts: int = EXPERTS):
    torch.manual_seed(0)
    q13 = quantize_nvfp4(torch.randn(experts, 2 * INTER, HIDDEN))
    q2 = quantize_nvfp4(torch.randn(experts, HIDDEN, INTER))
    # Per row, as the engine adapters keep them.
    w13_global = q13.global_scale[:, None].expand(experts, 2 * INTER).contiguous()
    w2_global = q2.global_scale[:, None].expand(experts, HIDDEN).contiguous()
    return q13.qdata, q13.scale, w13_global, q2.qdata, q2.scale, w2_global


def _moe_args(fake, tokens: int, top_k: int, dtype=torch.float16):
    weights = [fake(w) for w in _moe_weights()]
    x = fake(torch.randn(tokens, HIDDEN, dtype=dtype))
    topk_weights = fake(torch.rand(tokens, top_k))
    topk_ids = fake(torch.randint(0, EXPERTS, (tokens, top_k), dtype=torch.int32))
    return (x, *weights, topk_weights, topk_ids)


@pytest.mark.parametrize(("tokens", "top_k", "block_m"), [(1, 8, 16), (3, 2, 16), (300, 2, 64)])
def test_moe_alignment_shapes_depend_only_on_input_shapes(mode, fake, tokens, top_k, block_m):
    """On main this raised DynamicOutputShapeException (aten.bincount)."""
    topk_ids = fake(torch.randint(0, EXPERTS, (tokens, top_k)))
    with mode:
        align = moe_align_block_size(topk_ids, block_m, EXPERTS)
    pairs = tokens * top_k
    capacity = -(-(pairs + min(pairs, EXPERTS) * (block_m - 1)) // block_m) * block_m
    assert align.sorted_ids.shape == (capacity,) and align.expert_ids.shape == (capacity // block_m,)
    assert align.num_padded.shape == (1,)


@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (2, 4), (40, 2)], ids=["decode", "pairs=E", "prefill"])
def test_moe_reference_runs_under_fake_tensors(mode, fake, tokens, top_k):
    """The torch backend is the CUDA path below sm_80; on main it raised on aten._unique2 (`.tolist()`)."""
    args = _moe_args(fake, tokens, top_k)
    with mode:
        out = nvfp4_moe(*args, "gelu_tanh", backend="torch")
    assert out.shape == (tokens, HIDDEN) and out.dtype == torch.float16


def test_linear_references_run_under_fake_tensors(mode, fake):
    q = quantize_nvfp4(torch.randn(48, HIDDEN))
    x = fake(torch.randn(5, HIDDEN, dtype=torch.float16))
    with mode:
        out = nvfp4_gemm(x, fake(q.qdata), fake(q.scale), fake(q.global_scale), backend="torch")
    assert out.shape == (5, 48)
    for granularity in ("tensor", "channel", "block"):
        w, s = quantize_fp8(torch.randn(48, HIDDEN), granularity)
        w, s = fake(w), fake(s)
        with mode:
            assert fp8_gemm(x, w, s, backend="torch").shape == (5, 48)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_scaled_mm_path_runs_under_fake_tensors(mode, fake, granularity):
    from nvfp4_ext.kernels.ops import _fp8_scaled_mm

    w, s = quantize_fp8(torch.randn(48, HIDDEN), granularity)
    args = (fake(torch.randn(5, HIDDEN, dtype=torch.bfloat16)), fake(w), fake(s.reshape(-1)), None)
    with mode:
        assert _fp8_scaled_mm(*args).shape == (5, 48)


@pytest.mark.parametrize("tokens", [1, 3, 300])
def test_moe_launcher_host_code_runs_under_fake_tensors(mode, fake, monkeypatch, tokens):
    """Alignment, config choice, global scales and both launches, with the range check of `topk_ids`
    skipped as it is during capture. On main: DynamicOutputShapeException (aten.bincount)."""
    from nvfp4_ext.kernels import nvfp4_moe_kernel

    gate_up, down = _RecordedLaunch(), _RecordedLaunch()
    monkeypatch.setattr(nvfp4_moe_kernel, "_moe_gate_up_kernel", gate_up)
    monkeypatch.setattr(nvfp4_moe_kernel, "_moe_down_kernel", down)
    args = _moe_args(fake, tokens, 2)
    with mode:
        out = nvfp4_moe_kernel.nvfp4_moe_triton(*args, "silu")
    assert out.shape == (tokens, HIDDEN)
    assert len(gate_up.calls) == 1 and len(down.calls) == 1
    config = nvfp4_moe_kernel.select_moe_config(tokens, EXPERTS, 2)
    blocks = -(-(2 * tokens + min(2 * tokens, EXPERTS) * (config.block_m - 1)) // config.block_m)
    assert gate_up.calls[0][0] == (blocks * -(-INTER // config.gate_up.block_n),)


@pytest.mark.parametrize("m", [1, 40, 130])
def test_gemm_launchers_host_code_runs_under_fake_tensors(mode, fake, monkeypatch, m):
    from nvfp4_ext.kernels import fp8_gemm_kernel, nvfp4_gemm_kernel

    gemm, fp8 = _RecordedLaunch(), _RecordedLaunch()
    monkeypatch.setattr(nvfp4_gemm_kernel, "_nvfp4_gemm_kernel", gemm)
    monkeypatch.setattr(fp8_gemm_kernel, "_fp8_gemm_kernel", fp8)
    q = quantize_nvfp4(torch.randn(48, 2048))
    x = fake(torch.randn(m, 2048, dtype=torch.float16))
    bias = fake(torch.randn(48, dtype=torch.float16))
    weights = fake(q.qdata), fake(q.scale), fake(q.global_scale)
    with mode:
        out = nvfp4_gemm_kernel.nvfp4_gemm_triton(x, *weights, bias)
    assert out.shape == (m, 48) and len(gemm.calls) == 1
    for granularity in ("tensor", "channel", "block"):
        w, s = quantize_fp8(torch.randn(48, 2048), granularity)
        w, s = fake(w), fake(s)
        with mode:
            assert fp8_gemm_kernel.fp8_gemm_triton(x, w, s, bias).shape == (m, 48)
    assert len(fp8.calls) == 3


# --------------------------------------------------------------------------------------- engine adapters
def test_vllm_adapters_forward_glue_runs_under_fake_tensors(monkeypatch):
    """What vLLM captures around our ops: expert-parallel id translation in the MoE method and the linear
    methods' op calls (the ops' own insides are covered above), with vLLM's real method base classes."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    import vllm.model_executor.parameter as vllm_parameter

    from nvfp4_ext.engines.vllm.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.vllm.linear import Nvfp4ExtLinearMethod
    from nvfp4_ext.engines.vllm.moe import Nvfp4ExtFusedMoEMethod

    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    config = Nvfp4ExtConfig.from_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})
    loader = {"weight_loader": lambda *args, **kwargs: None}

    moe = Nvfp4ExtFusedMoEMethod(config, "nvfp4", "layers.0.experts", SimpleNamespace(intermediate_size=None))
    experts = torch.nn.Module()
    moe.create_weights(experts, EXPERTS, HIDDEN, INTER, torch.float32, **loader)
    linear = Nvfp4ExtLinearMethod(config, "nvfp4", "layers.0.mlp.down_proj")
    dense = torch.nn.Module()
    linear.create_weights(dense, HIDDEN, [48], HIDDEN, 48, torch.float32, **loader)
    for layer in (experts, dense):
        for _, param in layer.named_parameters():
            if param.dtype != torch.uint8:
                param.data.fill_(1.0)
    moe.process_weights_after_loading(experts)
    linear.process_weights_after_loading(dense)
    experts.activation = "silu"
    # Expert parallelism: this rank holds experts 4..7 as local 0..3; the others map to -1.
    experts.expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(3, HIDDEN))
        topk_ids = mode.from_tensor(torch.randint(0, EXPERTS, (3, 2), dtype=torch.int32))
        out = moe.apply(experts, x, mode.from_tensor(torch.rand(3, 2)), topk_ids)
        assert out.shape == (3, HIDDEN)
        assert linear.apply(dense, x).shape == (3, 48)


def test_flashinfer_w4a4_host_code_runs_under_fake_tensors(mode, fake, monkeypatch):
    """Our code around FlashInfer's two calls (activation padding, output slice, per-row globals) at an
    unaligned width; the calls themselves return outputs of FlashInfer's documented shapes."""
    import sys
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    from nvfp4_ext.engines.common import flashinfer_nvfp4_weights, nvfp4_linear_forward

    def fp4_quantize(x, global_scale):
        m, k = x.shape
        return x.new_empty((m, k // 2), dtype=torch.uint8), x.new_empty((-(-m // 128) * 128, -(-k // 64) * 4))

    def mm_fp4(a, b, a_descale, b_descale, alpha, out_dtype, backend):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)

    module = ModuleType("flashinfer")
    module.__spec__ = ModuleSpec("flashinfer", None)
    module.fp4_quantize, module.mm_fp4 = fp4_quantize, mm_fp4
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    q = quantize_nvfp4(torch.randn(528, 528))
    weight, swizzled = flashinfer_nvfp4_weights(q.qdata, q.scale)
    args = [fake(t) for t in (weight, q.scale, q.global_scale.expand(528).contiguous())]
    scales = [fake(t) for t in (torch.tensor(0.02), torch.tensor([50.0]), swizzled)]
    x = fake(torch.randn(2, 3, 528))
    with mode:
        out = nvfp4_linear_forward(
            x, *args, None, "flashinfer", input_global=scales[0], input_global_inv=scales[1],
            weight_scale_swizzled=scales[2],
        )
    assert out.shape == (2, 3, 528) and out.dtype == torch.float32


def test_packing_for_the_kernels_copies_nothing_from_the_host():
    """`pack_nvfp4_weights` runs inside the launchers when they get checkpoint bytes, possibly while a CUDA
    graph is captured, where a host-to-device copy is illegal. On meta tensors (no data, so a host read
    fails too), no call may build a tensor from Python data (`torch.tensor` of a constant table, copied to
    the device at every call) or touch a tensor off the weight's device."""
    from torch.overrides import TorchFunctionMode

    from nvfp4_ext.kernels.nvfp4_words import pack_nvfp4_weights

    seen: list[str] = []

    class HostData(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.as_tensor, torch.from_numpy):
                seen.append(f"{func.__name__}{args[:1]}")
            for value in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(value, torch.Tensor) and value.device.type != "meta":
                    seen.append(f"{func}: {value.device}")
            return func(*args, **(kwargs or {}))

    weight = torch.empty(64, 32, dtype=torch.uint8, device="meta")
    scale = torch.empty(64, 4, dtype=torch.float8_e4m3fn, device="meta")
    with HostData():
        words, codes = pack_nvfp4_weights(weight, scale, check_values=False)
    assert (words.dtype, tuple(words.shape), codes.dtype, tuple(codes.shape)) == (
        torch.int32, (64, 8), torch.uint8, (64, 4),
    )
    assert not seen, seen[:3]
