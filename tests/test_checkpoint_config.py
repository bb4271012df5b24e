"""Quantization-config parsing: every real config form, scheme resolution, excludes and errors."""

from __future__ import annotations

import json

import pytest

from nvfp4_ext.checkpoint.config import (
    find_quant_config,
    fused_name,
    fused_shards,
    group_fused,
    parse_quant_config,
    pattern_matches,
)
from nvfp4_ext.checkpoint.names import PatternMatcher
from nvfp4_ext.errors import CheckpointError

EXCLUDES = ["lm_head", "model.layers.0.self_attn*", "*router*", "model.vision_tower*"]

FLAT_MODELOPT = {
    "quant_method": "modelopt",
    "quant_algo": "NVFP4",
    "group_size": 16,
    "ignore": EXCLUDES,
    "kv_cache_scheme": {"type": "float", "num_bits": 8},
}
LEGACY = {
    "producer": {"name": "modelopt", "version": "0.47.0"},
    "quantization": {
        "quant_algo": "NVFP4",
        "group_size": 16,
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": EXCLUDES,
    },
}
MIXED = {
    "producer": {"name": "modelopt"},
    "quantization": {
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
        "quantized_layers": {
            "model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"},
            "model.layers.0.self_attn.k_proj": {"quant_algo": "FP8"},
            "model.layers.0.self_attn.v_proj": {"quant_algo": "FP8"},
            "model.layers.0.mlp.experts": {"quant_algo": "NVFP4", "group_size": 16},
            "model.layers.1.mlp.experts.0.gate_proj": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
            "model.layers.1.mlp.experts.0.up_proj": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
            "model.layers.1.mlp.experts.1.gate_proj": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
            "model.layers.1.mlp.experts.1.up_proj": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
            "model.layers.1.mlp.experts.0.down_proj": {"quant_algo": "FP8_PB_WO"},
            "model.layers.2.self_attn.q_proj": {"quant_algo": "NVFP4", "group_size": 16},
            "model.layers.2.self_attn.k_proj": {"quant_algo": "FP8"},
            "model.layers.3.self_attn.o_proj": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
        },
    },
}
NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
COMPRESSED = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": NVFP4_ARGS,
            "input_activations": {**NVFP4_ARGS, "dynamic": "local"},
        }
    },
    "ignore": ["lm_head", "re:.*router.*", "re:model\\.layers\\.0\\.self_attn\\..*"],
    "kv_cache_scheme": None,
}


def test_flat_modelopt() -> None:
    q = parse_quant_config(FLAT_MODELOPT, "config.json")
    assert (q.producer, q.quant_algo, q.group_size, q.kv_cache_algo) == ("modelopt", "NVFP4", 16, "FP8")
    assert q.global_scale_convention == "modelopt"
    assert q.exclude == tuple(EXCLUDES)
    assert q.scheme_for("model.layers.1.self_attn.q_proj") == "nvfp4"
    assert q.scheme_for("model.layers.0.self_attn.q_proj") == "unquantized"
    assert q.excluded_by("model.layers.0.self_attn.qkv_proj") == "model.layers.0.self_attn*"
    assert q.excluded_by("lm_head") == "lm_head"
    assert q.excluded_by("model.layers.3.router.proj") == "*router*"
    assert q.excluded_by("model.vision_tower.encoder.layers.0.mlp.fc1") == "model.vision_tower*"
    assert q.excluded_by("model.layers.3.mlp.experts.5.gate_proj") is None
    assert q.scheme_for("model.layers.3.mlp.experts.gate_up_proj") == "nvfp4"


def test_legacy_hf_quant_config_equals_flat() -> None:
    flat = parse_quant_config(FLAT_MODELOPT, "config.json")
    legacy = parse_quant_config(LEGACY, "hf_quant_config.json")
    assert legacy.source == "hf_quant_config.json"
    for module in ("lm_head", "model.layers.0.self_attn.o_proj", "model.layers.5.mlp.down_proj", "x.router"):
        assert legacy.scheme_for(module) == flat.scheme_for(module)
    assert legacy.kv_cache_algo == "FP8"


def test_w4a16_and_weight_only_downgrade() -> None:
    q = parse_quant_config({"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"})
    assert q.scheme_for("a.q_proj") == "nvfp4_w4a16"
    downgraded = parse_quant_config(
        {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "config_groups": {"g": {"input_activations": None}},
        }
    )
    assert downgraded.scheme_for("a.q_proj") == "nvfp4_w4a16"


@pytest.mark.parametrize(
    ("module", "scheme"),
    [
        ("model.layers.0.self_attn.q_proj", "fp8"),
        ("model.layers.0.self_attn.qkv_proj", "fp8"),
        ("model.layers.0.self_attn.o_proj", "unquantized"),  # not listed
        ("model.layers.0.mlp.experts.7.gate_proj", "nvfp4"),  # child of a listed prefix
        ("model.layers.0.mlp.experts.gate_up_proj", "nvfp4"),
        ("model.layers.1.mlp.experts.gate_up_proj", "nvfp4_w4a16"),  # fused 3-D from per-expert entries
        ("model.layers.1.mlp.experts.1.gate_proj", "nvfp4_w4a16"),
        ("model.layers.1.mlp.experts.down_proj", "fp8_block"),
        ("model.layers.3.self_attn.o_proj", "fp8_channel"),
        ("lm_head", "unquantized"),
    ],
)
def test_mixed_precision(module: str, scheme: str) -> None:
    q = parse_quant_config(MIXED, "hf_quant_config.json")
    assert q.quant_algo == "MIXED_PRECISION"
    assert q.scheme_for(module) == scheme


def test_mixed_precision_fused_shards_disagree() -> None:
    q = parse_quant_config(MIXED, "hf_quant_config.json")
    assert q.scheme_for("model.layers.2.self_attn.q_proj") == "nvfp4"
    with pytest.raises(
        CheckpointError, match=r"shards of model\.layers\.2\.self_attn\.qkv_proj have different"
    ):
        q.scheme_for("model.layers.2.self_attn.qkv_proj")


def test_compressed_tensors() -> None:
    q = parse_quant_config(COMPRESSED, "config.json")
    assert q.producer == "compressed-tensors"
    assert q.quant_algo == "nvfp4-pack-quantized"
    assert q.global_scale_convention == "compressed_tensors"
    assert q.scheme_for("model.layers.1.mlp.down_proj") == "nvfp4"
    assert q.scheme_for("model.layers.1.router.proj") == "unquantized"
    assert q.excluded_by("model.layers.0.self_attn.k_proj") == "re:model\\.layers\\.0\\.self_attn\\..*"
    assert q.scheme_for("lm_head") == "unquantized"
    w4a16 = {**COMPRESSED, "config_groups": {"g": {"targets": ["Linear"], "weights": NVFP4_ARGS}}}
    assert parse_quant_config(w4a16).scheme_for("a.up_proj") == "nvfp4_w4a16"


def test_compressed_tensors_mixed_groups_and_precedence() -> None:
    cfg = {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision",
        "config_groups": {
            "experts": {
                "targets": ["re:.*experts.*"],
                "weights": NVFP4_ARGS,
                "format": "nvfp4-pack-quantized",
            },
            "attn": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                "format": "float-quantized",
            },
            "blocky": {
                "targets": ["model.layers.0.mlp.down_proj"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "block",
                    "block_structure": [128, 128],
                },
                "format": "float-quantized",
            },
        },
    }
    q = parse_quant_config(cfg)
    assert q.scheme_for("model.layers.0.mlp.experts.2.up_proj") == "nvfp4_w4a16"
    assert q.scheme_for("model.layers.0.self_attn.o_proj") == "fp8_channel"
    assert q.scheme_for("model.layers.0.mlp.down_proj") == "fp8_block"  # exact name beats "Linear"
    assert q.is_nvfp4


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"quant_method": "modelopt", "quant_algo": "NVFP5"},
            r"quantization_config\.quant_algo: unknown quant_algo 'NVFP5'",
        ),
        ({"quant_method": "modelopt"}, r"quantization_config\.quant_algo: missing"),
        ({"quant_method": "gptq"}, r"quantization_config\.quant_method: unsupported quant_method 'gptq'"),
        (
            {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32},
            r"group_size: NVFP4 needs group_size 16",
        ),
        (
            {
                "quant_method": "modelopt",
                "quant_algo": "MIXED_PRECISION",
                "quantized_layers": {"a": {"quant_algo": "INT3"}},
            },
            r'quantized_layers\["a"\]\.quant_algo: unknown quant_algo',
        ),
        (
            {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION"},
            r"quantized_layers: MIXED_PRECISION needs",
        ),
        (
            {**COMPRESSED, "format": "pack-quantized"},
            r"quantization_config\.format: unknown format 'pack-quantized'",
        ),
        (
            {
                **COMPRESSED,
                "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}},
            },
            r"config_groups\.g\.weights: unsupported weights",
        ),
        (
            {**COMPRESSED, "ignore": ["lm_head", "re:model.layers.(0"]},
            r"quantization_config\.ignore: invalid regular expression 're:model\.layers\.\(0'",
        ),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": "lm_head*"}, None),
    ],
)
def test_bad_configs_name_the_field(cfg: dict, message: str | None) -> None:
    if message is None:
        assert parse_quant_config(cfg, "config.json").exclude == ("lm_head*",)
        return
    with pytest.raises(CheckpointError, match=message) as info:
        parse_quant_config(cfg, "config.json")
    assert info.value.file == "config.json"


def test_find_quant_config(tmp_path) -> None:
    assert find_quant_config(tmp_path) is None
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(LEGACY))
    legacy = find_quant_config(tmp_path)
    assert legacy is not None and legacy.source.endswith("hf_quant_config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "quantization_config": COMPRESSED}))
    found = find_quant_config(tmp_path)
    assert (
        found is not None and found.producer == "compressed-tensors" and found.source.endswith("config.json")
    )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        find_quant_config(tmp_path)
    with pytest.raises(CheckpointError, match="model directory not found"):
        find_quant_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="is not a directory"):
        find_quant_config(tmp_path / "config.json")


def test_fused_helpers() -> None:
    assert fused_shards("m.self_attn.qkv_proj") == (
        "m.self_attn.q_proj",
        "m.self_attn.k_proj",
        "m.self_attn.v_proj",
    )
    assert fused_shards("m.mlp.down_proj") == ("m.mlp.down_proj",)
    assert fused_name("m.mlp.up_proj") == ("m.mlp.gate_up_proj", 1)
    assert fused_name("m.mlp.down_proj") is None
    groups = group_fused(
        ["a.q_proj", "a.k_proj", "a.v_proj", "a.o_proj", "b.gate_proj", "b.up_proj", "c.q_proj"]
    )
    assert groups == {
        "a.qkv_proj": ["a.q_proj", "a.k_proj", "a.v_proj"],
        "b.gate_up_proj": ["b.gate_proj", "b.up_proj"],
    }


@pytest.mark.parametrize(
    ("pattern", "module", "expected"),
    [
        ("lm_head", "lm_head", True),
        ("lm_head", "model.lm_head", True),
        ("model.layers.0.self_attn", "model.layers.0.self_attn.q_proj", True),
        ("model.layers.1", "model.layers.10.mlp.up_proj", False),
        ("gate", "model.layers.1.mlp.gate_proj", False),
        ("gate", "model.layers.1.mlp.gate", True),
        ("*router*", "model.layers.1.router.proj", True),
        ("re:.*\\.experts\\..*", "m.experts.0.up_proj", True),
        ("re:experts", "m.experts.0.up_proj", False),
    ],
)
def test_pattern_matches(pattern: str, module: str, expected: bool) -> None:
    assert pattern_matches(pattern, module) is expected


def test_pattern_matcher_agrees_with_pattern_matches() -> None:
    patterns = [
        "lm_head",
        "model.layers.0.self_attn",
        "*router*",
        "re:.*\\.experts\\.1\\..*",
        "gate",
        "x.y.z",
    ]
    modules = [
        "lm_head", "model.lm_head", "model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
        "model.layers.1.mlp.router.proj", "m.experts.1.up_proj", "m.experts.10.up_proj", "a.mlp.gate",
        "a.mlp.gate_proj", "w.x.y.z", "x.y.z.w", "x.y",
    ]  # fmt: skip
    matcher = PatternMatcher(patterns)
    for module in modules:
        found = matcher.first_match(module)
        expected = [p for p in patterns if pattern_matches(p, module)]
        assert (found is None) == (not expected), module
        assert found is None or found in expected


def test_kv_cache_only_export_keeps_weights_unquantized() -> None:
    legacy = {
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"},
    }
    q = parse_quant_config(legacy, "hf_quant_config.json")
    assert (q.quant_algo, q.kv_cache_algo, q.scheme_for("m.layers.0.mlp.up_proj")) == (
        "NONE",
        "FP8",
        "unquantized",
    )
    assert not q.is_nvfp4
