"""Layer logic of the engine adapters without running an engine: exact fused-shard scales, TP shard slicing
(through vLLM's own expert loader code), loaded-scale checks, header validation, and the quantization-method
override contract (claims only when asked)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from nvfp4_ext.kernels import nvfp4_moe_ref
from safetensors.torch import save_file

from nvfp4_ext.checkpoint.config import parse_quant_config
from nvfp4_ext.engines.common import (
    assert_loaded,
    check_nvfp4_partition,
    nvfp4_linear_forward,
    pack_for_triton_kernels,
    per_row_global,
    working_tp_sizes,
)
from nvfp4_ext.errors import CheckpointError, ConfigError
from nvfp4_ext.format import dequantize_nvfp4, nvfp4_linear, quantize_nvfp4, stored_global_scale
from tolerances import assert_within_rounding, linear_terms, moe_terms


def _shards(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # q, k, v with very different magnitudes: their global scales differ by orders of magnitude.
    return [torch.randn(n, 64, generator=g) * amp for n, amp in ((64, 1.0), (32, 0.02), (32, 40.0))]


def test_fused_layer_equals_unfused_shards_where_max_global_does_not():
    shards = _shards()
    quantized = [quantize_nvfp4(w) for w in shards]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    unfused = torch.cat([nvfp4_linear(x, q.qdata, q.scale, q.global_scale) for q in quantized], dim=1)

    weight = torch.cat([q.qdata for q in quantized])
    scale = torch.cat([q.scale for q in quantized])
    stored = torch.stack([q.global_scale for q in quantized])
    ours = nvfp4_linear_forward(
        x, weight, scale, per_row_global(stored, [64, 32, 32], "modelopt"), None, "torch"
    )
    assert_within_rounding(ours, unfused, linear_terms(x, torch.cat([q.dequantize() for q in quantized])))

    # vLLM's built-in: one global (the max) for the fused weight, block scales left as they are.
    builtin = nvfp4_linear(x, weight, scale, stored.max())
    k_cols = slice(64, 96)
    rel = (builtin[:, k_cols] - unfused[:, k_cols]).norm() / unfused[:, k_cols].norm()
    assert rel > 100, f"max-global fusion should be badly off on the small shard, relative error {rel:.3g}"


def test_per_row_global_reads_compressed_tensors_divisors():
    quantized = [quantize_nvfp4(w) for w in _shards(2)]
    multipliers = torch.stack([q.global_scale for q in quantized])
    divisors = stored_global_scale(multipliers, "compressed_tensors")
    ct = per_row_global(divisors, [64, 32, 32], "compressed_tensors")
    mo = per_row_global(multipliers, [64, 32, 32], "modelopt")
    assert ct.shape == (128,)
    torch.testing.assert_close(ct, mo, rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match="expected 3 shard global scales"):
        per_row_global(multipliers[:2], [64, 32, 32], "modelopt")


# --------------------------------------------------------------------------------- tensor parallelism
def test_diffusion_gemma_expert_width_at_tp8_is_refused_with_a_working_size():
    assert working_tp_sizes(704) == [1, 2, 4]
    check_nvfp4_partition("model.layers.0.experts", "expert intermediate size", 704, 352)
    check_nvfp4_partition("model.layers.0.experts", "expert intermediate size", 704, 176)
    with pytest.raises(ConfigError) as info:
        check_nvfp4_partition("model.layers.3.experts", "expert intermediate size", 704, 88)
    message = str(info.value)
    assert "model.layers.3.experts" in message and "88" in message and "--tensor-parallel-size 4" in message


def test_row_parallel_split_of_packed_weight_and_block_scales_is_exact():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    q = quantize_nvfp4(w)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    full = nvfp4_linear(x, q.qdata, q.scale, q.global_scale)
    tp, k_part = 2, 64
    partial = torch.zeros_like(full)
    for rank in range(tp):
        # What RowvLLMParameter.load_row_parallel_weight does with our [N, K/2] and [N, K/16] parameters.
        weight = q.qdata.narrow(1, rank * k_part // 2, k_part // 2)
        scale = q.scale.narrow(1, rank * k_part // 16, k_part // 16)
        xs = x[:, rank * k_part : (rank + 1) * k_part]
        torch.testing.assert_close(
            dequantize_nvfp4(weight, scale, q.global_scale),
            q.dequantize()[:, rank * k_part : (rank + 1) * k_part],
        )
        partial += nvfp4_linear(xs, weight, scale, q.global_scale)
    assert_within_rounding(partial, full, linear_terms(x, q.dequantize()))


@pytest.mark.vllm
def test_vllm_expert_loader_splits_nvfp4_experts_on_block_boundaries():
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    experts, hidden, inter, tp = 4, 32, 64, 2
    gen = torch.Generator().manual_seed(5)
    gate, up = (
        torch.randn(experts, inter, hidden, generator=gen),
        torch.randn(experts, inter, hidden, generator=gen),
    )
    down = torch.randn(experts, hidden, inter, generator=gen)
    qg, qu, qd = quantize_nvfp4(gate), quantize_nvfp4(up), quantize_nvfp4(down)
    x = torch.randn(6, hidden, generator=gen)
    topk_ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]])
    topk_w = torch.rand(6, 2, generator=gen)

    def w13_global(g_gate, g_up, rows):
        return torch.stack([g_gate, g_up], 1).repeat_interleave(rows, dim=1)

    full = nvfp4_moe_ref(
        x,
        torch.cat([qg.qdata, qu.qdata], 1),
        torch.cat([qg.scale, qu.scale], 1),
        w13_global(qg.global_scale, qu.global_scale, inter),
        qd.qdata,
        qd.scale,
        qd.global_scale[:, None].expand(-1, hidden),
        topk_w,
        topk_ids,
        "silu",
    )
    part = inter // tp
    total = torch.zeros_like(full)
    for rank in range(tp):
        fake = SimpleNamespace(
            moe_config=SimpleNamespace(is_act_and_mul=True, moe_parallel_config=SimpleNamespace(tp_size=tp)),
            _get_hidden_dim=RoutedExperts._get_hidden_dim,
            _narrow_expert_data_for_padding=RoutedExperts._narrow_expert_data_for_padding,
        )
        w13 = torch.empty(experts, 2 * part, hidden // 2, dtype=torch.uint8)
        s13 = torch.full((experts, 2 * part, hidden // 16), float("nan"), dtype=torch.float8_e4m3fn)
        w2 = torch.empty(experts, hidden, part // 2, dtype=torch.uint8)
        s2 = torch.full((experts, hidden, part // 16), float("nan"), dtype=torch.float8_e4m3fn)
        for e in range(experts):
            for shard_id, src in (("w1", qg), ("w3", qu)):
                RoutedExperts._load_w13(fake, w13[e], 0, shard_id, src.qdata[e], rank)
                RoutedExperts._load_w13(fake, s13[e], 0, shard_id, src.scale[e], rank)
            RoutedExperts._load_w2(fake, w2[e], 1, qd.qdata[e], rank)
            RoutedExperts._load_w2(fake, s2[e], 1, qd.scale[e], rank)
        assert_loaded("experts", {"w13_weight_scale": s13, "w2_weight_scale": s2}, "NVFP4 MoE")
        total += nvfp4_moe_ref(
            x,
            w13,
            s13,
            w13_global(qg.global_scale, qu.global_scale, part),
            w2,
            s2,
            qd.global_scale[:, None].expand(-1, hidden),
            topk_w,
            topk_ids,
            "silu",
        )
    w13 = torch.cat([qg.dequantize(), qu.dequantize()], 1)
    assert_within_rounding(total, full, moe_terms(x, w13, qd.dequantize(), topk_w, topk_ids))


# ------------------------------------------------------------------------------------ loaded scales
def test_assert_loaded_names_the_unfilled_tensor():
    filled = torch.ones(4, 2)
    partly = torch.ones(4, 2)
    partly[2, 1] = float("nan")
    assert_loaded("model.layers.0.mlp.experts", {"w13_weight_scale_2": filled}, "NVFP4 MoE")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.w13_weight_scale_2.*index 2"):
        assert_loaded("model.layers.0.mlp.experts", {"w13_weight_scale_2": partly}, "NVFP4 MoE")
    with pytest.raises(CheckpointError, match="finite and positive"):
        assert_loaded("model.layers.0.o_proj", {"weight_scale_2": torch.tensor([-1.0])}, "NVFP4")



def test_pack_for_triton_kernels_refuses_bad_tensors_before_writing_anything():
    """A NaN block scale or a checkpoint-shaped mismatch is named, and the parameters keep their bytes (the
    in-place repack would otherwise leave a half-rewritten layer)."""
    q = quantize_nvfp4(torch.randn(40, 64))
    weight = torch.nn.Parameter(q.qdata.clone(), requires_grad=False)
    scale = torch.nn.Parameter(q.scale.clone(), requires_grad=False)
    scale.data.view(torch.uint8)[37, 2] = 0x7F  # e4m3 NaN in a late row (a later repack chunk)
    scale_bytes = scale.data.view(torch.uint8).clone()
    with pytest.raises(ValueError, match=r"layers\.0\.o_proj\.weight: block scale at index \[37, 2\] is NaN"):
        pack_for_triton_kernels(weight, scale, "layers.0.o_proj.weight")
    assert weight.dtype == torch.uint8 and torch.equal(weight, q.qdata)
    assert scale.dtype == torch.float8_e4m3fn and torch.equal(scale.data.view(torch.uint8), scale_bytes)
    with pytest.raises(ValueError, match="layers.0.o_proj.weight: expected uint8 codes"):
        pack_for_triton_kernels(weight, torch.nn.Parameter(q.scale[:, :2].clone()), "layers.0.o_proj.weight")


def _write_module(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"))
    return root


def _nvfp4_tensors(prefix: str, with_input: bool = False) -> dict[str, torch.Tensor]:
    q = quantize_nvfp4(torch.randn(32, 64))
    out = {
        f"{prefix}.weight": q.qdata,
        f"{prefix}.weight_scale": q.scale,
        f"{prefix}.weight_scale_2": q.global_scale,
    }
    if with_input:
        out[f"{prefix}.input_scale"] = torch.tensor(0.01)
    return out


def test_header_validation_names_file_and_tensor(tmp_path):
    from nvfp4_ext.engines.vllm.validate import validate_checkpoint

    w4a16 = parse_quant_config({"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"})
    nvfp4 = parse_quant_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})
    good = _write_module(tmp_path / "good", _nvfp4_tensors("a.o_proj"))
    assert "a.o_proj.weight" in validate_checkpoint(good, w4a16)

    no_scale = _nvfp4_tensors("a.o_proj")
    del no_scale["a.o_proj.weight_scale_2"]
    with pytest.raises(CheckpointError, match=r"tensor a\.o_proj\.weight_scale_2: missing"):
        validate_checkpoint(_write_module(tmp_path / "no_scale", no_scale), w4a16)

    bad_shape = _nvfp4_tensors("a.o_proj")
    bad_shape["a.o_proj.weight_scale"] = bad_shape["a.o_proj.weight_scale"][:, :2].contiguous()
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors, tensor a\.o_proj\.weight_scale: expected shape"
    ):
        validate_checkpoint(_write_module(tmp_path / "bad_shape", bad_shape), w4a16)

    with pytest.raises(CheckpointError, match=r"a\.o_proj\.input_scale: missing"):
        validate_checkpoint(good, nvfp4)
    assert validate_checkpoint(_write_module(tmp_path / "w4a4", _nvfp4_tensors("a.o_proj", True)), nvfp4)
    assert validate_checkpoint("org/not-a-local-dir", w4a16) is None


# ------------------------------------------------------------------------------- override contract
MODELOPT_NVFP4 = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["lm_head"]}
MODELOPT_W4A16 = {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "group_size": 16}
MODELOPT_MIXED = {
    "quant_method": "modelopt",
    "quant_algo": "MIXED_PRECISION",
    "quantized_layers": {
        "model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"},
        "model.layers.0.mlp.experts": {"quant_algo": "NVFP4", "group_size": 16},
    },
}
CT_NVFP4 = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
            "input_activations": None,
        }
    },
}
FP8 = {"quant_method": "modelopt", "quant_algo": "FP8"}
NVFP4_FORMS = [MODELOPT_NVFP4, MODELOPT_W4A16, MODELOPT_MIXED, CT_NVFP4]
FORM_IDS = ["modelopt-nvfp4", "modelopt-w4a16", "modelopt-mixed", "ct-nvfp4"]


@pytest.fixture(scope="module")
def plugin():
    from nvfp4_ext.engines.vllm import register

    register()
    register()  # idempotent: vLLM calls it in every process, sometimes more than once
    from nvfp4_ext.engines.vllm.config import Nvfp4ExtConfig

    return Nvfp4ExtConfig


@pytest.mark.vllm
def test_register_is_idempotent_and_adds_the_method(plugin):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    assert QUANTIZATION_METHODS.count("nvfp4_ext") == 1
    assert get_quantization_config("nvfp4_ext") is plugin


@pytest.mark.vllm
def test_register_points_diffusion_gemma_at_our_class_lazily(plugin):
    import importlib.util

    from vllm import ModelRegistry

    if importlib.util.find_spec("nvfp4_ext.engines.vllm.diffusion_gemma") is None:
        pytest.skip("this installation has no nvfp4_ext.engines.vllm.diffusion_gemma module")
    entry = ModelRegistry.models["DiffusionGemmaForBlockDiffusion"]
    assert (entry.module_name, entry.class_name) == (
        "nvfp4_ext.engines.vllm.diffusion_gemma",
        "Nvfp4ExtDiffusionGemma",
    )


@pytest.mark.vllm
@pytest.mark.parametrize("cfg", NVFP4_FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("user_quant", [None, "modelopt_fp4", "modelopt", "compressed-tensors", "fp8"])
def test_override_returns_none_unless_asked(plugin, cfg, user_quant):
    assert plugin.override_quantization_method(dict(cfg), user_quant) is None


@pytest.mark.vllm
@pytest.mark.parametrize("cfg", NVFP4_FORMS, ids=FORM_IDS)
def test_override_claims_nvfp4_checkpoints_when_asked(plugin, cfg):
    assert plugin.override_quantization_method(dict(cfg), "nvfp4_ext") == "nvfp4_ext"
    config = plugin.from_config(dict(cfg))
    assert config.get_name() == "nvfp4_ext"
    assert torch.float32 in config.get_supported_act_dtypes()


@pytest.mark.vllm
def test_override_refuses_what_it_cannot_serve_naming_the_method(plugin):
    with pytest.raises(ConfigError, match=r"quantization method is 'modelopt' \(quant_algo 'FP8'\)"):
        plugin.override_quantization_method(dict(FP8), "nvfp4_ext")
    with pytest.raises(ConfigError, match="no quantization_config"):
        plugin.override_quantization_method(None, "nvfp4_ext")
    with pytest.raises(ConfigError, match=r"'gptq'"):
        plugin.override_quantization_method({"quant_method": "gptq", "bits": 4}, "nvfp4_ext")


@pytest.mark.vllm
def test_without_our_flag_vllm_keeps_its_own_choice(plugin):
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

    assert plugin.override_quantization_method(dict(MODELOPT_NVFP4), None) is None
    assert ModelOptNvFp4Config.override_quantization_method(dict(MODELOPT_NVFP4), None) == "modelopt_fp4"


@pytest.mark.vllm
def test_scheme_resolution_maps_vllm_prefixes(plugin):
    config = plugin.from_config(dict(MODELOPT_MIXED))
    assert config.scheme("model.layers.0.mlp.experts") == "nvfp4"
    assert config.scheme("model.layers.0.self_attn.q_proj") == "fp8"
    assert config.scheme("model.layers.1.self_attn.o_proj") == "unquantized"
    config.apply_vllm_mapper(SimpleNamespace(orig_to_new_prefix={"model.decoder.": "model."}))
    config.modules = frozenset({"model.decoder.layers.0.mlp.experts.0.gate_proj"})
    assert config.hf_name("model.layers.0.mlp.experts") == "model.decoder.layers.0.mlp.experts"


@pytest.mark.vllm
@pytest.mark.parametrize(("rows", "cols"), [(128, 4), (200, 6), (48, 2)])
def test_flashinfer_scale_swizzle_inverts_with_vllms_reader(rows, cols):
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import convert_swizzled_to_linear

    from nvfp4_ext.engines.common import swizzle_block_scales

    scale = (torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows)) * 8 + 0.1).to(
        torch.float8_e4m3fn
    )
    swizzled = swizzle_block_scales(scale)
    assert swizzled.shape == (-(-rows // 128) * 128, -(-cols // 4) * 4)
    back = convert_swizzled_to_linear(swizzled.view(torch.uint8), rows, cols * 16, 16)
    assert torch.equal(
        back[:rows, :cols], scale.view(torch.uint8)
    )  # its column slice is in elements, not scales


_PLUGIN_PROBE = (
    "from vllm.plugins import load_general_plugins; load_general_plugins(); "
    "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS; "
    "print('REGISTERED=' + str('nvfp4_ext' in QUANTIZATION_METHODS))"
)


@pytest.mark.vllm
@pytest.mark.parametrize(("plugins", "expected"), [("nvfp4_ext", "True"), ("other_plugin", "False")])
def test_vllm_plugins_env_selects_or_disables_the_entry_point(plugins, expected):
    import os
    import subprocess
    import sys

    env = {**os.environ, "VLLM_PLUGINS": plugins}
    proc = subprocess.run(
        [sys.executable, "-c", _PLUGIN_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"REGISTERED={expected}" in proc.stdout


def test_header_validation_flags_float_projection_the_config_calls_nvfp4(tmp_path):
    from nvfp4_ext.engines.vllm.validate import validate_checkpoint

    tensors = {
        **_nvfp4_tensors("a.o_proj"),
        "a.q_proj.weight": torch.randn(32, 64, dtype=torch.bfloat16),
        "a.embed_tokens.weight": torch.randn(8, 64),
        "a.norm.weight": torch.ones(64),
    }
    root = _write_module(tmp_path / "ckpt", tensors)
    w4a16 = parse_quant_config({"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"})
    with pytest.raises(
        CheckpointError, match=r"tensor a\.q_proj\.weight: stored as BF16 \[32, 64\].*nvfp4_w4a16"
    ):
        validate_checkpoint(root, w4a16)
    excluded = parse_quant_config(
        {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "ignore": ["a.q_proj"]}
    )
    assert validate_checkpoint(root, excluded)
