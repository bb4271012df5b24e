"""Checkpoint tensor name -> SGLang parameter of DiffusionGemma (pure python: no SGLang import).

The checkpoint stores the shared text stack under `model.decoder.*`, the encoder's per-layer scalars and
the vision tower under `model.encoder.*`, and experts either per expert
(`experts.<e>.{gate,up,down}_proj.<suffix>`, NVFP4 exports) or fused (`experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj`, BF16 -- or NVFP4 with `_weight_scale`/`_weight_scale_2`/`_input_scale` companions).
SGLang's model keeps the stack under `model.*` with fused qkv_proj / gate_up_proj linears and the experts in
`moe.experts.w13_*` / `w2_*` (FusedMoE). `route()` decides where each tensor goes, so the loader can
refuse a tensor nothing consumes and the mapping can be tested on a checkpoint's full tensor list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Route", "hf_module_name", "route"]

RouteKind = Literal["param", "expert", "fused_expert", "encoder_scalar", "vision", "tied", "kv_scale"]

# (fused param, checkpoint shard, shard id) -- SGLang's packed_modules_mapping order.
STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_EXPERT_SHARD = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_PER_EXPERT = re.compile(
    r"^(?P<layer>model\.layers\.\d+)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>\w+)$"
)
_FUSED_EXPERT = re.compile(
    r"^(?P<layer>model\.layers\.\d+)\.experts\.(?P<proj>gate_up_proj|down_proj)"
    r"(?:_(?P<suffix>weight_scale_2|weight_scale|input_scale))?$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ENCODER_SCALAR = re.compile(r"^model\.encoder\.(?:language_model\.)?layers\.(\d+)\.layer_scalar$")


@dataclass(frozen=True, slots=True)
class Route:
    """Where one checkpoint tensor goes.

    Attributes:
        kind: "param" (a plain or stacked parameter), "expert" (one expert shard), "fused_expert" (a 3-D
            tensor of all experts, split into `shards` per expert), "encoder_scalar", "vision" (handed to
            SGLang's Gemma 4 vision loader), "tied" (a copy of tied weights: consumed, not loaded) or
            "kv_scale" (an FP8 KV-cache scale: the KV cache stays in the model dtype, so it is not used).
        param: the SGLang parameter name (empty for "vision" and "tied").
        shard: stacked shard id ("q", "k", "v", 0, 1) or expert shard ("w1", "w2", "w3"); None if unsharded.
        expert: the expert index of an "expert" route.
        shards: the expert shards a "fused_expert" tensor holds, in order along dim 1 (gate, up).
        duplicate_to_v: a full-attention k_proj tensor that also fills the v shard (K = V).
    """

    kind: RouteKind
    param: str = ""
    shard: str | int | None = None
    expert: int | None = None
    shards: tuple[str, ...] = ()
    duplicate_to_v: bool = False


def route(
    name: str, *, full_attention_layers: frozenset[int] | set[int], tied_embeddings: bool = True
) -> Route:
    """Route a checkpoint tensor to its SGLang parameter (see the module docstring for the layouts).

    Args:
        name: checkpoint tensor name.
        full_attention_layers: indices of full-attention layers (their k_proj doubles as v_proj).
        tied_embeddings: lm_head is tied to the embedding (always true for DiffusionGemma).
    Returns:
        the Route; names outside every known layout come back as kind "param" with their SGLang name and
        are checked against the model's parameters by the loader.
    """
    if name.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")):
        return Route("vision")
    scalar = _ENCODER_SCALAR.match(name)
    if scalar:
        return Route("encoder_scalar", f"model.layers.{scalar.group(1)}.encoder_layer_scalar")
    if name.startswith("model.encoder."):
        return Route("tied")  # the encoder's text weights are the decoder's (tied); SGLang runs one stack
    if tied_embeddings and name.startswith("lm_head."):
        return Route("tied")
    if name.endswith((".k_scale", ".v_scale", ".kv_scale")):
        return Route("kv_scale")
    name = name.replace("model.decoder.", "model.", 1)
    name = name.replace(".router.per_expert_scale", ".moe.per_expert_scale")

    expert = _PER_EXPERT.match(name)
    if expert:
        suffix = expert["suffix"]
        prefix = "w2" if expert["proj"] == "down_proj" else "w13"
        return Route(
            "expert",
            f"{expert['layer']}.moe.experts.{prefix}_{suffix}",
            shard=_EXPERT_SHARD[expert["proj"]],
            expert=int(expert["expert"]),
        )
    fused = _FUSED_EXPERT.match(name)
    if fused:
        suffix = fused["suffix"] or "weight"
        if fused["proj"] == "gate_up_proj":
            return Route("fused_expert", f"{fused['layer']}.moe.experts.w13_{suffix}", shards=("w1", "w3"))
        return Route("fused_expert", f"{fused['layer']}.moe.experts.w2_{suffix}", shards=("w2",))

    parts = name.split(".")
    for fused_param, shard_name, shard_id in STACKED:
        if shard_name in parts[:-1]:
            index = parts.index(shard_name)
            parts[index] = fused_param
            layer = _LAYER.match(name)
            dup = shard_id == "k" and layer is not None and int(layer.group(1)) in full_attention_layers
            return Route("param", ".".join(parts), shard=shard_id, duplicate_to_v=dup)
    return Route("param", name)


def hf_module_name(sglang_prefix: str) -> str:
    """SGLang module prefix -> the checkpoint's module name, for exclude / per-layer scheme lookups
    (`model.layers.0.moe.experts` -> `model.decoder.layers.0.experts`)."""
    name = sglang_prefix
    if name.startswith("model."):
        name = "model.decoder." + name[len("model.") :]
    name = name.replace(".moe.experts", ".experts")
    if name.startswith(("vision_tower", "embed_vision")):
        name = "model.encoder." + name
    return name
