"""vLLM's NVFP4 layers on our Triton kernels store the kernels' packed layout once, at load.

`process_weights_after_loading` of a layer whose backend is "triton" rewrites its weight and block-scale
parameters in place into `nvfp4_words` (int32 words [..., N, K/8], uint8 scale codes [..., N, K/16]), so the
launchers never repack per call. Driven with vLLM's real method base classes and its real layerwise reload
(`vllm.model_executor.model_loader.reload`) on CPU, with `backend_for` forced to "triton" where the adapter
modules look it up. Numbers: the adapter's forward on the packed parameters (torch reference backend,
which reads either layout) against an fp64 product of the ORIGINAL checkpoint tensors' dequantization.
The Triton launches themselves are recorded (no GPU): they must receive the stored words, not a repack.
The real kernels on packed weights run through vLLM in tests/test_vllm_triton_interpreter.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tolerances import assert_within_rounding, linear_terms, moe_terms

from nvfp4_ext.format import dequantize_nvfp4, quantize_nvfp4

pytestmark = pytest.mark.vllm

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
EXPERTS, HIDDEN, INTER = 4, 64, 32
SHARDS, K = [32, 16, 16], 64  # a fused qkv-like linear: three shards with their own global scales


@pytest.fixture
def vllm_methods(monkeypatch):
    """(linear module, MoE module) of our vLLM adapter, single rank, backend forced by `force(name)`."""
    pytest.importorskip("vllm")
    import vllm.model_executor.parameter as vllm_parameter

    import nvfp4_ext.engines.common as common
    import nvfp4_ext.engines.vllm.linear as linear
    import nvfp4_ext.engines.vllm.moe as moe

    # A single-rank layer without initialising torch.distributed in this process.
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(common, "BACKENDS_USED", {})

    def force(backend: str) -> None:
        for module in (linear, moe):
            monkeypatch.setattr(module, "backend_for", lambda kind, device, *, implemented=None: backend)

    return SimpleNamespace(linear=linear, moe=moe, force=force)


def _config():
    from nvfp4_ext.engines.vllm.config import Nvfp4ExtConfig

    return Nvfp4ExtConfig.from_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})


def _checkpoint_linear(seed: int = 0, amplitude: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    shards = [
        quantize_nvfp4(torch.randn(n, K, generator=g) * amplitude * (i + 1)) for i, n in enumerate(SHARDS)
    ]
    return {
        "weight": torch.cat([q.qdata for q in shards]),
        "weight_scale": torch.cat([q.scale for q in shards]),
        "weight_scale_2": torch.stack([q.global_scale for q in shards]),
        "input_scale": torch.full((len(SHARDS),), 0.02),
    }


def _dequantized_linear(ckpt) -> torch.Tensor:
    per_row = ckpt["weight_scale_2"].repeat_interleave(torch.tensor(SHARDS))
    return dequantize_nvfp4(ckpt["weight"], ckpt["weight_scale"], per_row)


def _linear_layer(methods, scheme: str = "nvfp4", loader=None):
    method = methods.linear.Nvfp4ExtLinearMethod(_config(), scheme, "layers.0.self_attn.qkv_proj")
    layer = torch.nn.Module()
    loader = loader or (lambda *args, **kwargs: None)
    method.create_weights(layer, K, SHARDS, K, sum(SHARDS), torch.float32, weight_loader=loader)
    layer.quant_method = method
    return method, layer


def _fill(layer, ckpt) -> None:
    for name, tensor in ckpt.items():
        if hasattr(layer, name):
            getattr(layer, name).data.copy_(tensor)


def _checkpoint_experts(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    gate, up = (quantize_nvfp4(torch.randn(EXPERTS, INTER, HIDDEN, generator=g)) for _ in range(2))
    down = quantize_nvfp4(torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * 0.1)
    return {
        "w13_weight": torch.cat([gate.qdata, up.qdata], 1),
        "w13_weight_scale": torch.cat([gate.scale, up.scale], 1),
        "w13_weight_scale_2": torch.stack([gate.global_scale, up.global_scale], 1),
        "w2_weight": down.qdata,
        "w2_weight_scale": down.scale,
        "w2_weight_scale_2": down.global_scale,
        "w13_input_scale": torch.full((EXPERTS, 2), 0.02),
        "w2_input_scale": torch.full((EXPERTS,), 0.02),
    }


def _dequantized_experts(ckpt) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = dequantize_nvfp4(
        ckpt["w13_weight"], ckpt["w13_weight_scale"], ckpt["w13_weight_scale_2"].repeat_interleave(INTER, 1)
    )
    w2 = dequantize_nvfp4(ckpt["w2_weight"], ckpt["w2_weight_scale"], ckpt["w2_weight_scale_2"][:, None])
    return w13, w2


def _expected_experts(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """sum over routes of w * down(silu(gate x) * up x), fp64; a negative id contributes nothing."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e >= 0:
                gate_up = w13[e].double() @ x[t].double()
                act = torch.nn.functional.silu(gate_up[:INTER]) * gate_up[INTER:]
                out[t] += float(topk_weights[t, j]) * (w2[e].double() @ act)
    return out


def _moe_layer(methods, ckpt):
    method = methods.moe.Nvfp4ExtFusedMoEMethod(
        _config(), "nvfp4", "layers.0.mlp.experts", SimpleNamespace(intermediate_size=None)
    )
    layer = torch.nn.Module()
    method.create_weights(layer, EXPERTS, HIDDEN, INTER, torch.float32, weight_loader=lambda *a, **kw: None)
    _fill(layer, ckpt)
    layer.activation, layer.expert_map = "silu", None
    return method, layer


def _params(layer, names):
    return {name: getattr(layer, name) for name in names}


def _assert_packed_in_place(before: dict, layer, weight: str, scale: str) -> None:
    """The same Parameter objects over the same storage, now int32 words and uint8 scale codes."""
    w, s = getattr(layer, weight), getattr(layer, scale)
    assert w is before[weight] and s is before[scale]
    assert w.data_ptr() == before[f"{weight}@"] and s.data_ptr() == before[f"{scale}@"]
    lead, half_k = tuple(before[f"{weight}#"][:-1]), before[f"{weight}#"][-1]
    assert w.dtype == torch.int32 and tuple(w.shape) == (*lead, half_k // 4)
    assert s.dtype == torch.uint8 and tuple(s.shape) == (*lead, half_k // 8)


def _snapshot(layer, names) -> dict:
    out = {}
    for name in names:
        param = getattr(layer, name)
        out[name], out[f"{name}@"], out[f"{name}#"] = param, param.data_ptr(), list(param.shape)
    return out


# ------------------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("scheme", ["nvfp4", "nvfp4_w4a16"])
def test_triton_linear_packs_in_place_and_computes_the_checkpoint_product(vllm_methods, scheme):
    vllm_methods.force("triton")
    method, layer = _linear_layer(vllm_methods, scheme)
    ckpt = _checkpoint_linear()
    _fill(layer, ckpt)
    before = _snapshot(layer, ["weight", "weight_scale"])
    method.process_weights_after_loading(layer)
    assert method.backend == "triton"
    _assert_packed_in_place(before, layer, "weight", "weight_scale")
    method.process_weights_after_loading(layer)  # processing again leaves packed weights as they are
    _assert_packed_in_place(before, layer, "weight", "weight_scale")

    method.backend = "torch"  # the reference reads the packed parameters too
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(7))
    w = _dequantized_linear(ckpt)
    assert_within_rounding(method.apply(layer, x), x.double() @ w.double().t(), linear_terms(x, w))


@pytest.mark.parametrize("backend", ["torch", "emulated", "flashinfer"])
def test_linear_on_other_backends_keeps_checkpoint_bytes(vllm_methods, backend):
    vllm_methods.force(backend)
    method, layer = _linear_layer(vllm_methods)
    _fill(layer, _checkpoint_linear())
    method.process_weights_after_loading(layer)
    assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float8_e4m3fn
    assert layer.weight.shape[1] >= K // 2  # FlashInfer pads to multiples of 32, in checkpoint bytes


def test_vllm_layerwise_reload_repacks_new_weights_into_the_same_storage(vllm_methods):
    """vLLM's weight reload (RL weight sync, sleep mode) restores the shapes it recorded at model init,
    loads, reruns process_weights_after_loading and copies into the tensors the kernels captured."""
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
        record_metadata_for_reloading,
    )
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    vllm_methods.force("triton")
    method, layer = _linear_layer(vllm_methods, "nvfp4_w4a16", loader=default_weight_loader)
    record_metadata_for_reloading(layer)  # what vLLM does right after building the model

    def load(ckpt):
        for name in ("weight", "weight_scale", "weight_scale_2"):
            param = getattr(layer, name)
            param.weight_loader(param, ckpt[name])

    load(_checkpoint_linear(seed=0))
    method.process_weights_after_loading(layer)
    before = _snapshot(layer, ["weight", "weight_scale"])
    before["weight#"], before["weight_scale#"] = [sum(SHARDS), K // 2], [sum(SHARDS), K // 16]
    new = _checkpoint_linear(seed=5, amplitude=3.0)
    initialize_layerwise_reload(layer)
    assert layer.weight.dtype == torch.uint8  # restored to the checkpoint's dtype for loading
    load(new)
    finalize_layerwise_reload(layer, None)
    _assert_packed_in_place(before, layer, "weight", "weight_scale")
    method.backend = "torch"
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(8))
    w = _dequantized_linear(new)
    assert_within_rounding(method.apply(layer, x), x.double() @ w.double().t(), linear_terms(x, w))


# --------------------------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["all-experts", "expert-parallel"])
def test_triton_moe_packs_w13_and_w2_in_place_and_computes_the_checkpoint_experts(
    vllm_methods, monkeypatch, expert_parallel
):
    import nvfp4_ext.engines.common as common

    vllm_methods.force("triton")
    # 3 rows of 32 bytes per repack step: many chunks, the last one partial (w13 has 4 x 64 rows).
    monkeypatch.setattr(common, "_REPACK_CHUNK_BYTES", 100)
    ckpt = _checkpoint_experts()
    method, layer = _moe_layer(vllm_methods, ckpt)
    names = ["w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"]
    before = _snapshot(layer, names)
    method.process_weights_after_loading(layer)
    assert method.backend == "triton"
    _assert_packed_in_place(before, layer, "w13_weight", "w13_weight_scale")
    _assert_packed_in_place(before, layer, "w2_weight", "w2_weight_scale")

    method.backend = "torch"
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, HIDDEN, generator=g)
    topk_weights = torch.rand(6, 2, generator=g)
    topk_ids = torch.tensor([[0, 3], [1, 2], [3, 0], [2, 1], [0, 2], [1, 3]], dtype=torch.int32)
    w13, w2 = _dequantized_experts(ckpt)
    expected_ids = topk_ids
    if expert_parallel:
        # This rank owns global experts 4..7 as its local 0..3; routes to experts 0..3 live elsewhere.
        layer.expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)
        shift = torch.tensor([[4, 0], [0, 4], [4, 4], [0, 0], [4, 0], [0, 4]], dtype=torch.int32)
        topk_ids = topk_ids + shift
        expected_ids = layer.expert_map[topk_ids.long()]
    out = method.apply(layer, x, topk_weights, topk_ids)
    terms = moe_terms(x, w13, w2, topk_weights, expected_ids)
    assert_within_rounding(out, _expected_experts(x, w13, w2, topk_weights, expected_ids), terms)


@pytest.mark.parametrize("backend", ["torch", "emulated"])
def test_moe_on_other_backends_keeps_checkpoint_bytes(vllm_methods, backend):
    vllm_methods.force(backend)
    method, layer = _moe_layer(vllm_methods, _checkpoint_experts())
    method.process_weights_after_loading(layer)
    for proj in ("w13", "w2"):
        assert getattr(layer, f"{proj}_weight").dtype == torch.uint8
        assert getattr(layer, f"{proj}_weight_scale").dtype == torch.float8_e4m3fn


# -------------------------------------------------------------------------------- the Triton launches
class _RecordedLaunch:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **meta)` records its tensor arguments."""

    def __init__(self) -> None:
        self.tensors: list[list[torch.Tensor]] = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.tensors.append([a for a in (*args, *meta.values()) if isinstance(a, torch.Tensor)])

        return launch


def _launched(record: _RecordedLaunch, param: torch.Tensor) -> bool:
    """Whether every recorded launch received `param`'s own storage (not a per-call repack of it)."""
    return bool(record.tensors) and all(
        any(t.data_ptr() == param.data_ptr() and t.dtype == param.dtype for t in launch)
        for launch in record.tensors
    )


def _kernel_module_copies(name: str) -> list:
    """`nvfp4_ext.kernels.<name>`, plus the second copy of it that exists when transformers' probe for the
    PyPI `kernels` package imported this repository's kernels/ as a top-level `kernels` (`python -m pytest`
    puts the repository root on sys.path); the `torch.ops.nvfp4_ext` ops may call either copy."""
    top_level = sys.modules.get("kernels")
    prefixes = ["nvfp4_ext.kernels"]
    if top_level is not None and Path(getattr(top_level, "__file__", "") or "").parent == KERNELS_DIR:
        prefixes.append("kernels")
    return [importlib.import_module(f"{prefix}.{name}") for prefix in prefixes]


def record_triton_launches(monkeypatch) -> dict[str, _RecordedLaunch]:
    """Replace the NVFP4 GEMM and MoE kernels by recorders, and let backend="triton" take CPU tensors (as
    under TRITON_INTERPRET=1): the launchers' host code runs, nothing is launched."""
    records = {name: _RecordedLaunch() for name in ("gemm", "gate_up", "down")}
    for gemm in _kernel_module_copies("nvfp4_gemm_kernel"):
        monkeypatch.setattr(gemm, "_nvfp4_gemm_kernel", records["gemm"])
    for moe in _kernel_module_copies("nvfp4_moe_kernel"):
        monkeypatch.setattr(moe, "_moe_gate_up_kernel", records["gate_up"])
        monkeypatch.setattr(moe, "_moe_down_kernel", records["down"])
    for ops in _kernel_module_copies("ops"):
        monkeypatch.setattr(ops, "interpreter_enabled", lambda: True)
    return records


def assert_launched_stored_words(records, linear_layer, experts, calls: int) -> None:
    """Every launch read the parameters' own words and codes: nothing was repacked per call."""
    assert len(records["gemm"].tensors) == calls and len(records["down"].tensors) == calls
    for record, layer, names in (
        (records["gemm"], linear_layer, ("weight", "weight_scale")),
        (records["gate_up"], experts, ("w13_weight", "w13_weight_scale")),
        (records["down"], experts, ("w2_weight", "w2_weight_scale")),
    ):
        for name in names:
            assert _launched(record, getattr(layer, name)), name


def test_triton_forwards_launch_the_stored_words_without_repacking(vllm_methods, monkeypatch):
    pytest.importorskip("triton")
    records = record_triton_launches(monkeypatch)
    vllm_methods.force("triton")
    method, layer = _linear_layer(vllm_methods)
    _fill(layer, _checkpoint_linear())
    method.process_weights_after_loading(layer)
    moe, experts = _moe_layer(vllm_methods, _checkpoint_experts())
    moe.process_weights_after_loading(experts)
    x = torch.randn(3, K, dtype=torch.float16)
    for _ in range(2):
        method.apply(layer, x)
        moe.apply(experts, x, torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32))
    assert_launched_stored_words(records, layer, experts, calls=2)
