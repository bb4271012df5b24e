"""Acceptance: quantize a tiny DiffusionGemma with each recipe; inspect, reader, ModelOpt oracle, dequant."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nvfp4_ext.checkpoint.inspect import inspect_checkpoint
from nvfp4_ext.checkpoint.reader import Checkpoint
from nvfp4_ext.checkpoint.validate import validate_checkpoint
from nvfp4_ext.quantize import PROVENANCE_FILE, QuantizedReader, dequantize_checkpoint, quantize_checkpoint
from nvfp4_ext.quantize.io import list_source_tensors
from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None
# (recipe, scales, calibrated) per output checkpoint under test.
VARIANTS = {
    "nvfp4": ("nvfp4", "rtn", True),
    "w4a16": ("w4a16", "rtn", False),
    "mixed": ("mixed", "mse", True),
    "mixed-nocalib": ("mixed", "four-over-six", False),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def source(workdir) -> Path:
    return build_tiny_diffusion_gemma(workdir / "src", dtype=torch.bfloat16, num_layers=2)


@pytest.fixture(scope="module")
def calib_text(workdir) -> Path:
    rng = random.Random(0)
    path = workdir / "calib.txt"
    path.write_text(" ".join(f"w{rng.randrange(4, 3000)}" for _ in range(300)))
    return path


@pytest.fixture(scope="module")
def outputs(workdir, source, calib_text) -> dict[str, Path]:
    made = {}
    for name, (recipe, scales, calibrated) in VARIANTS.items():
        made[name] = quantize_checkpoint(
            source,
            workdir / name,
            recipe=recipe,
            scales=scales,
            calib=calib_text if calibrated else None,
            progress=False,
        )
    return made


def _source_weights(source: Path) -> dict[str, torch.Tensor]:
    """Source weights by per-module name, fused experts split the way the quantizer must split them."""
    weights = {}
    for tensor in list_source_tensors(source):
        with safe_open(str(tensor.file), "pt") as f:
            w = f.get_tensor(tensor.name)
        if tensor.name.endswith("experts.gate_up_proj"):
            parent, half = tensor.name[: -len(".gate_up_proj")], w.shape[1] // 2
            for e in range(w.shape[0]):
                weights[f"{parent}.{e}.gate_proj"] = w[e, :half]
                weights[f"{parent}.{e}.up_proj"] = w[e, half:]
        elif tensor.name.endswith("experts.down_proj"):
            parent = tensor.name[: -len(".down_proj")]
            for e in range(w.shape[0]):
                weights[f"{parent}.{e}.down_proj"] = w[e]
        elif tensor.name.endswith(".weight"):
            weights[tensor.name[: -len(".weight")]] = w
    return weights


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inspect_every_expert_is_nvfp4(outputs, variant):
    report = inspect_checkpoint(str(outputs[variant]))
    experts = [m for m in report["modules"] if ".experts." in m["name"]]
    assert len(experts) == 2 * 8 * 3  # 2 layers x 8 experts x gate/up/down, all split out
    assert {m["scheme"] for m in experts} <= {"nvfp4", "nvfp4_w4a16"}
    assert sum(m["bytes"] for m in experts if m["scheme"] == "unquantized") == 0
    nvfp4 = [s for k, s in report["summary"]["by_scheme"].items() if k.startswith("nvfp4")]
    bits = sum(s["bytes"] for s in nvfp4) * 8 / sum(s["params"] for s in nvfp4)
    assert bits <= 4.5 * 1.01
    expected = "nvfp4" if VARIANTS[variant][2] else "nvfp4_w4a16"
    assert {m["scheme"] for m in experts} == {expected}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reader_accepts_and_dequantizes_within_format_error(outputs, source, variant):
    validate_checkpoint(outputs[variant])
    ckpt = Checkpoint.open(outputs[variant])
    originals = _source_weights(source)
    checked = 0
    for record in ckpt.modules():
        if record.scheme == "unquantized":
            continue
        w = originals[record.name].float()
        deq = ckpt.dequantized_weight(record.name)
        assert deq.shape == w.shape, record.name
        rel = float((deq - w).norm() / w.norm())
        if record.scheme.startswith("nvfp4"):
            block_amax = w.reshape(w.shape[0], -1, 16).abs().amax(-1, keepdim=True)
            err = (deq - w).reshape(w.shape[0], -1, 16).abs()
            assert (err <= block_amax / 3 + 1e-12).all(), record.name
            assert rel < 0.15, (record.name, rel)
        else:
            assert rel < 0.05, (record.name, rel)
        checked += 1
    assert checked >= 48


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt not installed")
def test_rtn_bytes_identical_to_modelopt_for_every_tensor(outputs, source):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    reader = QuantizedReader(outputs["w4a16"])
    originals = _source_weights(source)
    modules = reader.quantized_modules()
    assert len(modules) == 48 + 7 + 6  # experts; q/k/v/o + MLP gate/up/down (the full layer has no v_proj)
    for module in modules:
        qtensor, scale, scale_2 = NVFP4QTensor.quantize(originals[module], 16)
        assert torch.equal(reader.raw(f"{module}.weight"), qtensor._quantized_data), module
        assert torch.equal(reader.raw(f"{module}.weight_scale").view(torch.uint8), scale.view(torch.uint8)), (
            module
        )
        assert torch.equal(reader.raw(f"{module}.weight_scale_2"), scale_2.float().reshape(())), module


def test_w4a4_input_scales_and_config(outputs):
    out = outputs["nvfp4"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == "NVFP4"
    assert config["group_size"] == 16
    for pattern in ("model.decoder.embed_tokens", "model.decoder.self_conditioning.gate_proj", "lm_head"):
        assert pattern in config["ignore"] and pattern in config["exclude_modules"]
    legacy = json.loads((out / "hf_quant_config.json").read_text())
    assert legacy["quantization"]["quant_algo"] == "NVFP4"
    assert {"group_size", "kv_cache_quant_algo", "exclude_modules"} <= set(legacy["quantization"])
    reader = QuantizedReader(out)
    for module in reader.quantized_modules():
        scale = reader.raw(f"{module}.input_scale")
        assert scale.dim() == 0 and 0 < float(scale) < 1, module
    for name in ("tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).is_file()


def test_mixed_config_lists_layers(outputs):
    config = json.loads((outputs["mixed"] / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == "MIXED_PRECISION"
    layers = config["quantized_layers"]
    assert layers["model.decoder.layers.0.experts.3.up_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["model.decoder.layers.0.self_attn.q_proj"] == {"quant_algo": "FP8"}
    assert layers["model.decoder.layers.1.mlp.down_proj"] == {"quant_algo": "FP8"}
    nocalib = json.loads((outputs["mixed-nocalib"] / "config.json").read_text())["quantization_config"]
    assert nocalib["quantized_layers"]["model.decoder.layers.0.self_attn.q_proj"] == {
        "quant_algo": "FP8_PB_WO"
    }
    assert (
        nocalib["quantized_layers"]["model.decoder.layers.0.experts.0.down_proj"]["quant_algo"]
        == "W4A16_NVFP4"
    )


def test_compressed_tensors_form_has_same_codes(outputs, source, workdir):
    ct = quantize_checkpoint(
        source, workdir / "ct", recipe="w4a16", output_format="compressed-tensors", progress=False
    )
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["config_groups"]["group_0"]["format"] == "nvfp4-pack-quantized"
    assert not (ct / "hf_quant_config.json").exists()
    modelopt, compressed = QuantizedReader(outputs["w4a16"]), QuantizedReader(ct)
    assert modelopt.quantized_modules() == compressed.quantized_modules()
    for module in modelopt.quantized_modules():
        assert torch.equal(modelopt.raw(f"{module}.weight"), compressed.raw(f"{module}.weight_packed"))
        divisor = compressed.raw(f"{module}.weight_global_scale")
        assert divisor.shape == (1,)
        assert float(divisor) == pytest.approx(1 / float(modelopt.raw(f"{module}.weight_scale_2")), rel=1e-6)
        # Same codes and block scales; only the reciprocal global scale's float rounding may differ.
        torch.testing.assert_close(modelopt.weight(module), compressed.weight(module), rtol=1e-6, atol=0)
    validate_checkpoint(ct)


def test_dequantized_checkpoint_has_original_layout_and_loads(outputs, source, workdir):
    from transformers import DiffusionGemmaForBlockDiffusion

    out = dequantize_checkpoint(outputs["w4a16"], workdir / "deq")
    original = {t.name: t.shape for t in list_source_tensors(source)}
    restored = {t.name: t.shape for t in list_source_tensors(out)}
    assert restored == original
    assert all(t.dtype == "F32" for t in list_source_tensors(out))
    reader = QuantizedReader(outputs["w4a16"])
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        fused = f.get_tensor("model.decoder.layers.1.experts.gate_up_proj")
    half = fused.shape[1] // 2
    assert torch.equal(fused[5, :half], reader.weight("model.decoder.layers.1.experts.5.gate_proj"))
    assert torch.equal(fused[5, half:], reader.weight("model.decoder.layers.1.experts.5.up_proj"))
    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.state_dict()["model.decoder.layers.1.experts.gate_up_proj"], fused)


def test_provenance_records_split_and_errors(outputs):
    info = json.loads((outputs["mixed"] / PROVENANCE_FILE).read_text())
    fused = info["fused_experts"]["model.decoder.layers.0.experts.gate_up_proj"]
    assert fused["projections"] == ["gate_proj", "up_proj"] and fused["num_experts"] == 8
    for layer in info["layers"]:
        assert layer["sse"] <= layer["sse_rtn"] * (1 + 1e-6), layer["tensor"]


@pytest.mark.skipif(not HAS_MODELOPT, reason="needs nvidia-modelopt")
def test_dequantize_fuses_a_modelopt_gemma4_export_per_expert_back_into_the_architectures_3d_experts(tmp_path):
    """ModelOpt exports Gemma 4's fused experts per expert and writes no provenance; transformers has no
    conversion for Gemma 4, so `dequantize_checkpoint` must fuse them itself, equal to ModelOpt's own
    dequantization fused by hand (tests/producers.py), or transformers would leave the experts random."""
    import sys

    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from producers import modelopt_case, read_tensors

    from nvfp4_ext.tiny_models import TINY_BUILDERS

    source = TINY_BUILDERS["gemma4-moe"](tmp_path / "source")
    case = modelopt_case(source, tmp_path, "w4a16")
    ours = dequantize_checkpoint(case["export"], tmp_path / "ours")
    mine, reference = read_tensors(ours), read_tensors(case["reference"])
    assert "model.layers.0.experts.gate_up_proj" in mine and not any(".experts.0." in k for k in mine)
    assert set(mine) == set(reference)
    for key, value in reference.items():
        assert torch.equal(mine[key], value), key
    _, info = transformers.AutoModelForCausalLM.from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
