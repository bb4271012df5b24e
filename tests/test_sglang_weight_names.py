"""DiffusionGemma checkpoint-name -> SGLang-parameter routing (pure python: runs without SGLang).

The CPU suite (test_sglang_cpu_plugin.py) loads a whole tiny checkpoint through the real model class; these
tests pin the individual routes, including layouts the tiny checkpoint does not contain.
"""

from __future__ import annotations

import pytest

from nvfp4_ext.engines.sglang.weight_names import Route, hf_module_name, route

FULL = frozenset({1, 3})


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "model.decoder.layers.0.self_attn.q_proj.weight",
            Route("param", "model.layers.0.self_attn.qkv_proj.weight", "q"),
        ),
        (
            "model.decoder.layers.0.self_attn.k_proj.weight_scale_2",
            Route("param", "model.layers.0.self_attn.qkv_proj.weight_scale_2", "k"),
        ),
        # full-attention layers have no v_proj: k fills the v shard too
        (
            "model.decoder.layers.1.self_attn.k_proj.weight_scale",
            Route("param", "model.layers.1.self_attn.qkv_proj.weight_scale", "k", duplicate_to_v=True),
        ),
        (
            "model.decoder.layers.0.self_attn.o_proj.input_scale",
            Route("param", "model.layers.0.self_attn.o_proj.input_scale"),
        ),
        (
            "model.decoder.layers.0.mlp.up_proj.weight",
            Route("param", "model.layers.0.mlp.gate_up_proj.weight", 1),
        ),
        (
            "model.decoder.self_conditioning.gate_proj.weight_scale",
            Route("param", "model.self_conditioning.gate_up_proj.weight_scale", 0),
        ),
        (
            "model.decoder.layers.2.experts.7.up_proj.weight_scale_2",
            Route("expert", "model.layers.2.moe.experts.w13_weight_scale_2", "w3", expert=7),
        ),
        (
            "model.decoder.layers.2.experts.0.down_proj.weight",
            Route("expert", "model.layers.2.moe.experts.w2_weight", "w2", expert=0),
        ),
        (
            "model.decoder.layers.2.experts.5.gate_proj.weight_packed",  # compressed-tensors names
            Route("expert", "model.layers.2.moe.experts.w13_weight_packed", "w1", expert=5),
        ),
        (
            "model.decoder.layers.0.experts.gate_up_proj",  # BF16 fused experts
            Route("fused_expert", "model.layers.0.moe.experts.w13_weight", shards=("w1", "w3")),
        ),
        (
            "model.decoder.layers.0.experts.down_proj_weight_scale_2",  # NVFP4 fused experts
            Route("fused_expert", "model.layers.0.moe.experts.w2_weight_scale_2", shards=("w2",)),
        ),
        (
            "model.decoder.layers.0.router.per_expert_scale",
            Route("param", "model.layers.0.moe.per_expert_scale"),
        ),
        ("model.decoder.layers.0.router.proj.weight", Route("param", "model.layers.0.router.proj.weight")),
        (
            "model.encoder.language_model.layers.3.layer_scalar",
            Route("encoder_scalar", "model.layers.3.encoder_layer_scalar"),
        ),
        ("model.encoder.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight", Route("vision")),
        ("model.encoder.embed_vision.embedding_projection.weight", Route("vision")),
        ("model.encoder.language_model.layers.0.mlp.gate_proj.weight", Route("tied")),
        ("lm_head.weight", Route("tied")),
        ("model.decoder.layers.0.self_attn.k_proj.k_scale", Route("kv_scale")),
        ("model.decoder.embed_tokens.weight", Route("param", "model.embed_tokens.weight")),
    ],
)
def test_route(name: str, expected: Route) -> None:
    assert route(name, full_attention_layers=FULL) == expected


def test_untied_lm_head_is_a_parameter() -> None:
    assert route("lm_head.weight", full_attention_layers=FULL, tied_embeddings=False) == Route(
        "param", "lm_head.weight"
    )


@pytest.mark.parametrize(
    "prefix, hf",
    [
        ("model.layers.0.self_attn.qkv_proj", "model.decoder.layers.0.self_attn.qkv_proj"),
        ("model.layers.4.moe.experts", "model.decoder.layers.4.experts"),
        ("model.self_conditioning.down_proj", "model.decoder.self_conditioning.down_proj"),
        (
            "vision_tower.encoder.layers.0.mlp.gate_proj",
            "model.encoder.vision_tower.encoder.layers.0.mlp.gate_proj",
        ),
    ],
)
def test_hf_module_name(prefix: str, hf: str) -> None:
    assert hf_module_name(prefix) == hf
