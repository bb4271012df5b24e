"""SGLang's NVFP4 layers on our Triton kernels store the kernels' packed layout at load, and give the
checkpoint's layout back for SGLang's weight updates.

Runs inside the SGLang subprocess of tests/test_sglang_isolated.py, with SGLang 0.5.23's real base classes,
its loaders' `default_weight_loader` and its weight-update steps (`DefaultModelLoader.
restore_weights_before_loading` / `postprocess_weights`, what `update_weights_from_disk` and
`begin_weight_update` / `end_weight_update` run); `backend_for` is forced to "triton" where the adapter
modules look it up. Numbers: the layers' forward on the packed parameters (torch reference backend, which
reads either layout) against an fp64 product of the ORIGINAL checkpoint tensors' dequantization; the Triton
launches are recorded (no GPU) and must receive the stored words, not a per-call repack.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("NVFP4_EXT_SGLANG_CHILD") != "1":
    pytest.skip("runs in the SGLang subprocess of test_sglang_isolated.py", allow_module_level=True)

from nvfp4_ext.engines.sglang.cpu_support import prepare_cpu_import  # noqa: E402

prepare_cpu_import()
pytest.importorskip("sglang")

from test_sglang_cpu_plugin import _load_expert_layer, _run_experts, _tiny_expert_checkpoint  # noqa: E402
from test_vllm_packed_weights import (  # noqa: E402
    EXPERTS,
    HIDDEN,
    INTER,
    SHARDS,
    K,
    _checkpoint_linear,
    _dequantized_linear,
    _expected_experts,
    assert_launched_stored_words,
    record_triton_launches,
)
from tolerances import assert_within_rounding, linear_terms, moe_terms  # noqa: E402

import nvfp4_ext.engines.common as common  # noqa: E402
from nvfp4_ext.format import dequantize_nvfp4  # noqa: E402

pytestmark = pytest.mark.sglang


@pytest.fixture
def force(monkeypatch):
    """`force(backend)`: what `backend_for` returns in our SGLang linear and MoE modules."""
    import nvfp4_ext.engines.sglang.linear as sglang_linear
    import nvfp4_ext.engines.sglang.moe as sglang_moe

    monkeypatch.setattr(common, "BACKENDS_USED", {})

    def set_backend(backend: str) -> None:
        for module in (sglang_linear, sglang_moe):
            monkeypatch.setattr(module, "backend_for", lambda kind, device, *, implemented=None: backend)

    return set_backend


def _linear_reference(ckpt, x) -> tuple[torch.Tensor, torch.Tensor]:
    w = _dequantized_linear(ckpt)
    return x.double() @ w.double().t(), linear_terms(x, w)


def _load_linear(layer, ckpt) -> None:
    """Through each parameter's own loader (SGLang's `default_weight_loader`: refuses a shape mismatch)."""
    for name, tensor in ckpt.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor)


def _linear(ckpt):
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.sglang.linear import Nvfp4ExtLinearMethod

    config = Nvfp4ExtConfig.from_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})
    method = Nvfp4ExtLinearMethod(config, "nvfp4", "blk.self_attn.qkv_proj")
    layer = torch.nn.Module()
    method.create_weights(
        layer, K, SHARDS, K, sum(SHARDS), torch.float32, weight_loader=default_weight_loader
    )
    _load_linear(layer, ckpt)
    method.process_weights_after_loading(layer)
    layer.quant_method = method
    return layer


def _expert_reference(ckpt: dict, x, topk_weights, topk_ids):
    """fp64 routed experts from the per-expert checkpoint tensors (-1: dropped by expert parallelism)."""
    deq = {
        key: dequantize_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"]) for key, t in ckpt.items()
    }
    w13 = torch.stack([torch.cat([deq[(e, "gate_proj")], deq[(e, "up_proj")]]) for e in range(EXPERTS)])
    w2 = torch.stack([deq[(e, "down_proj")] for e in range(EXPERTS)])
    expected = _expected_experts(x, w13, w2, topk_weights, topk_ids)
    return expected, moe_terms(x, w13, w2, topk_weights, topk_ids)


def _route(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, HIDDEN, generator=g)
    topk_ids = torch.tensor([[0, 3], [1, 2], [3, 0], [2, -1], [0, 2], [1, 3]], dtype=torch.int32)
    return x, torch.rand(6, 2, generator=g), topk_ids


def _assert_packed(weight, scale, checkpoint_weight_shape) -> None:
    *lead, half_k = checkpoint_weight_shape
    assert weight.dtype == torch.int32 and tuple(weight.shape) == (*lead, half_k // 4)
    assert scale.dtype == torch.uint8 and tuple(scale.shape) == (*lead, half_k // 8)


# ------------------------------------------------------------------------------------------------- load
def test_triton_linear_packs_in_place_and_computes_the_checkpoint_product(force):
    force("triton")
    ckpt = _checkpoint_linear(0)
    layer = _linear(ckpt)
    assert layer.nvfp4_backend == "triton"
    _assert_packed(layer.weight, layer.weight_scale, ckpt["weight"].shape)
    layer.nvfp4_backend = "torch"  # the reference reads the packed parameters too
    x = torch.randn(5, K)
    expected, terms = _linear_reference(ckpt, x)
    assert_within_rounding(layer.quant_method.apply(layer, x), expected, terms)


def test_triton_experts_pack_w13_and_w2_and_compute_the_checkpoint_experts(force):
    force("triton")
    ckpt = _tiny_expert_checkpoint(EXPERTS, HIDDEN, INTER)
    experts = _load_expert_layer(ckpt, EXPERTS, HIDDEN, INTER)
    assert experts.nvfp4_backend == "triton"
    _assert_packed(experts.w13_weight, experts.w13_weight_scale, (EXPERTS, 2 * INTER, HIDDEN // 2))
    _assert_packed(experts.w2_weight, experts.w2_weight_scale, (EXPERTS, HIDDEN, INTER // 2))
    experts.nvfp4_backend = "torch"
    x, topk_weights, topk_ids = _route(1)
    expected, terms = _expert_reference(ckpt, x, topk_weights, topk_ids)
    assert_within_rounding(_run_experts(experts, x, topk_weights, topk_ids), expected, terms)


def test_torch_backend_keeps_checkpoint_bytes(force):
    force("torch")
    layer = _linear(_checkpoint_linear(0))
    experts = _load_expert_layer(_tiny_expert_checkpoint(EXPERTS, HIDDEN, INTER), EXPERTS, HIDDEN, INTER)
    for weight in (layer.weight, experts.w13_weight, experts.w2_weight):
        assert weight.dtype == torch.uint8


def test_triton_forwards_launch_the_stored_words_without_repacking(force, monkeypatch):
    pytest.importorskip("triton")
    records = record_triton_launches(monkeypatch)
    force("triton")
    layer = _linear(_checkpoint_linear(0))
    experts = _load_expert_layer(_tiny_expert_checkpoint(EXPERTS, HIDDEN, INTER), EXPERTS, HIDDEN, INTER)
    x, topk_weights, topk_ids = _route(2)
    for _ in range(2):
        layer.quant_method.apply(layer, x[:, :K].half())
        _run_experts(experts, x.half(), topk_weights, topk_ids)
    assert_launched_stored_words(records, layer, experts, calls=2)


# ------------------------------------------------------------------------------------ weight updates
def test_weight_update_restores_the_checkpoint_layout_then_repacks_the_new_weights(force):
    """SGLang's `update_weights_from_disk`: restore_weights_before_loading, load through the parameters'
    loaders, postprocess_weights. Without the restore, a load into packed experts is refused by name."""
    from sglang.srt.model_loader.loader import DefaultModelLoader

    from nvfp4_ext.errors import CheckpointError

    force("triton")
    model = torch.nn.Module()
    old_linear = _checkpoint_linear(0)
    model.linear = _linear(old_linear)
    old_experts = _tiny_expert_checkpoint(EXPERTS, HIDDEN, INTER)
    model.experts = _load_expert_layer(old_experts, EXPERTS, HIDDEN, INTER)
    new_experts = {  # other weights: rows reversed, global scales halved
        key: {
            "weight": tensors["weight"].flip(0),
            "weight_scale": tensors["weight_scale"].view(torch.uint8).flip(0).view(torch.float8_e4m3fn),
            "weight_scale_2": tensors["weight_scale_2"] * 0.5,
        }
        for key, tensors in old_experts.items()
    }
    w2 = model.experts.w2_weight
    with pytest.raises(CheckpointError, match="w2_weight"):
        w2.weight_loader(w2, new_experts[(0, "down_proj")]["weight"], "w2_weight", "w2", 0)

    params = {name: param for name, param in model.named_parameters()}
    DefaultModelLoader.restore_weights_before_loading(model, torch.device("cpu"))
    assert model.linear.weight.dtype == torch.uint8 and model.linear.weight.shape == (sum(SHARDS), K // 2)
    assert model.linear.weight_scale.dtype == torch.float8_e4m3fn
    assert model.experts.w13_weight.shape == (EXPERTS, 2 * INTER, HIDDEN // 2)
    assert model.experts.w2_weight_scale.dtype == torch.float8_e4m3fn
    # The same values back (a partial update keeps the tensors it does not load).
    linear = model.linear
    restored = dequantize_nvfp4(linear.weight, linear.weight_scale, linear.nvfp4_global_per_row)
    assert torch.equal(restored, _dequantized_linear(old_linear))

    new_linear = _checkpoint_linear(3, amplitude=4.0)
    _load_linear(model.linear, new_linear)
    shard_of = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for (e, proj), tensors in new_experts.items():
        prefix = "w2" if proj == "down_proj" else "w13"
        for suffix, tensor in tensors.items():
            param = getattr(model.experts, f"{prefix}_{suffix}")
            param.weight_loader(param, tensor, f"{prefix}_{suffix}", shard_of[proj], e)
    DefaultModelLoader.postprocess_weights(model, torch.device("cpu"))

    assert all(param is params[name] for name, param in model.named_parameters())
    _assert_packed(model.linear.weight, model.linear.weight_scale, new_linear["weight"].shape)
    _assert_packed(model.experts.w2_weight, model.experts.w2_weight_scale, (EXPERTS, HIDDEN, INTER // 2))
    model.linear.nvfp4_backend = model.experts.nvfp4_backend = "torch"
    x = torch.randn(4, K)
    expected, terms = _linear_reference(new_linear, x)
    assert_within_rounding(model.linear.quant_method.apply(model.linear, x), expected, terms)
    x, topk_weights, topk_ids = _route(4)
    expected, terms = _expert_reference(new_experts, x, topk_weights, topk_ids)
    assert_within_rounding(_run_experts(model.experts, x, topk_weights, topk_ids), expected, terms)


def test_weight_update_unpads_a_flashinfer_layer(monkeypatch):
    """FlashInfer layers are padded at load (multiples of 32): the restore gives the checkpoint's shape
    back, byte for byte."""
    monkeypatch.setattr(common, "select_backend", lambda kind, capability: "flashinfer")
    monkeypatch.setattr(common, "BACKENDS_USED", {})
    from test_sglang_cpu_capture import _linear as flashinfer_linear

    method, layer, q = flashinfer_linear(528, 528)
    assert layer.weight.shape == (544, 272)
    method.restore_weights_before_loading(layer)
    assert torch.equal(layer.weight, q.qdata)
    assert torch.equal(layer.weight_scale.view(torch.uint8), q.scale.view(torch.uint8))
