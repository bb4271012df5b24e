"""DiffusionGemma for SGLang with NVFP4 weights: a same-named subclass of SGLang's
`DiffusionGemmaForBlockDiffusion` that accepts `--quantization nvfp4_ext`.

SGLang hard-codes the architecture name in a dozen places (dLLM config, attention registry, overrides), so
the plugin keeps the name and replaces the registry entry. Upstream refuses any quant config and loads
experts only from the fused BF16 layout; this class builds the text stack with our config (the vision
tower stays BF16), loads per-expert NVFP4 and fused BF16 / NVFP4 experts, and refuses checkpoints with
tensors nothing consumes or parameters nothing filled -- instead of upstream's silent skip.
Without a quant config it is upstream unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models import gemma4_diffusion as upstream

from nvfp4_ext.engines.sglang.weight_names import Route, hf_module_name, route
from nvfp4_ext.errors import CheckpointError, ConfigError

__all__ = ["ARCHITECTURE", "DiffusionGemmaForBlockDiffusion"]

logger = logging.getLogger("nvfp4_ext")

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
# Activation scales are optional (W4A16 exports have none); the methods check the ones they need.
_OPTIONAL_SUFFIXES = ("input_scale", "input_global_scale")


class DiffusionGemmaForBlockDiffusion(upstream.DiffusionGemmaForBlockDiffusion):
    """SGLang's DiffusionGemma, plus NVFP4 / mixed checkpoints under `--quantization nvfp4_ext`."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        if quant_config is None:
            super().__init__(config, quant_config=None, prefix=prefix)
            return
        from nvfp4_ext.engines.sglang.config import QUANT_NAME, Nvfp4ExtConfig

        if not isinstance(quant_config, Nvfp4ExtConfig):
            raise ConfigError(
                f"DiffusionGemma loads quantized checkpoints only with --quantization {QUANT_NAME} "
                f"(got {quant_config.get_name()})"
            )
        quant_config.module_name_mapper = hf_module_name
        quant_config.packed_modules_mapping = {
            **self.packed_modules_mapping,
            **quant_config.packed_modules_mapping,
        }
        # Upstream's __init__ raises on a quant config, so this mirrors it with the config passed through.
        upstream.PreTrainedModel.__init__(self, config=config)
        self.pp_group = upstream.get_parallel().pp_group
        if self.pp_group.world_size != 1:
            raise ConfigError("DiffusionGemma does not support pipeline parallelism")
        if not (
            getattr(config, "tie_word_embeddings", False)
            and getattr(config.text_config, "tie_word_embeddings", False)
        ):
            raise ConfigError("DiffusionGemma requires tied word embeddings")
        self.config = config
        self.text_config = config.text_config
        self.quant_config = quant_config
        self.model = upstream.DiffusionGemmaModel(
            config, quant_config=quant_config, prefix=upstream.add_prefix("model", prefix)
        )
        # The vision tower is a small share of the weights and stays in the checkpoint's BF16.
        self.vision_tower = upstream.Gemma4VisionEncoder(
            config.vision_config,
            quant_config=None,
            prefix=upstream.add_prefix("vision_tower", prefix),
            mask_pad_before_pool=True,
        )
        self.embed_vision = upstream.Gemma4MultimodalEmbedder(
            config.vision_config,
            self.text_config,
            quant_config=None,
            prefix=upstream.add_prefix("embed_vision", prefix),
        )
        self.lm_head = self.model.embed_tokens
        self.logits_processor = upstream.LogitsProcessor(self.text_config, return_full_logits=True)
        self.post_init()

    # ------------------------------------------------------------------------------------------- loading
    def full_attention_layers(self) -> frozenset[int]:
        return frozenset(i for i, kind in enumerate(self.text_config.layer_types) if kind == "full_attention")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load every checkpoint tensor; raise `CheckpointError` for one nothing consumes, or for a
        parameter no tensor filled (activation scales excepted: W4A16 exports have none).
        Unquantized models load exactly as upstream does."""
        if self.quant_config is None:
            return super().load_weights(weights)
        params = dict(self.named_parameters())
        params.update(dict(self.named_buffers()))
        full_layers = self.full_attention_layers()
        tied = bool(getattr(self.text_config, "tie_word_embeddings", True))
        loaded: set[str] = set()
        vision: list[tuple[str, torch.Tensor]] = []
        kv_scales_seen = False
        for name, tensor in weights:
            where = route(name, full_attention_layers=full_layers, tied_embeddings=tied)
            if where.kind == "tied":
                continue
            if where.kind == "kv_scale":
                if not kv_scales_seen:
                    logger.warning(
                        "nvfp4_ext: the checkpoint has FP8 KV-cache scales (e.g. %s); DiffusionGemma keeps "
                        "its KV cache in the model dtype, so they are not used",
                        name,
                    )
                kv_scales_seen = True
                continue
            if where.kind == "vision":
                vision.append((name, tensor))
                continue
            param = params.get(where.param)
            if param is None:
                raise CheckpointError(
                    f"unexpected tensor: it maps to {where.param!r}, which this model does not have (is the "
                    "checkpoint's quantization config consistent with its tensors?)",
                    tensor=name,
                )
            try:
                self._load_one(param, where, tensor)
            except (CheckpointError, AssertionError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"cannot load into {where.param}: {exc}", tensor=name) from exc
            loaded.add(where.param)
        if vision:
            loaded.update(self._load_vision(vision))
        self._check_all_loaded(loaded)
        return loaded

    def _load_vision(self, tensors: list[tuple[str, torch.Tensor]]) -> set[str]:
        """The vision tower through upstream's Gemma 4 vision mapping (unquantized, unchanged)."""
        upstream_logger = logging.getLogger(upstream.__name__)
        level = upstream_logger.level
        # Upstream warns about every parameter its call did not fill: here, the whole text stack.
        upstream_logger.setLevel(logging.ERROR)
        try:
            return set(super().load_weights(tensors))
        finally:
            upstream_logger.setLevel(level)

    def _load_one(self, param: torch.nn.Parameter, where: Route, tensor: torch.Tensor) -> None:
        if where.kind == "expert":
            param.weight_loader(param, tensor, where.param, where.shard, where.expert)
        elif where.kind == "fused_expert":
            for expert in range(tensor.shape[0]):
                per_expert = tensor[expert]
                if per_expert.dim() == 0 or per_expert.numel() == 1:  # one scale for all shards
                    chunks = [per_expert.reshape(1)] * len(where.shards)
                elif per_expert.dim() == 1:  # one scale per shard
                    chunks = list(per_expert.reshape(-1, 1))
                else:
                    chunks = per_expert.chunk(len(where.shards), dim=0)
                for chunk, shard in zip(chunks, where.shards, strict=True):
                    param.weight_loader(param, chunk, where.param, shard, expert)
        elif where.kind == "encoder_scalar":
            default_weight_loader(param, tensor)
        elif where.shard is not None:
            param.weight_loader(param, tensor, where.shard)
            if where.duplicate_to_v:
                param.weight_loader(param, tensor, "v")
        else:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)

    def _check_all_loaded(self, loaded: set[str]) -> None:
        missing = sorted(
            name
            for name, _ in self.named_parameters()
            if name not in loaded and not name.endswith(_OPTIONAL_SUFFIXES)
        )
        if missing:
            raise CheckpointError(
                f"{len(missing)} parameter(s) were not filled by the checkpoint, e.g. {missing[:5]}",
                tensor=missing[0],
            )


EntryClass = DiffusionGemmaForBlockDiffusion
