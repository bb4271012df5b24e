"""The `nvfp4_ext` QuantizationConfig for vLLM: claims NVFP4 checkpoints only when the user asks for it.

`--quantization nvfp4_ext` on a ModelOpt NVFP4 / W4A16_NVFP4 / MIXED_PRECISION checkpoint or a
compressed-tensors NVFP4 checkpoint -> our linear, FP8 and MoE methods. Any other checkpoint with
`--quantization nvfp4_ext` fails at startup naming the checkpoint's method (vLLM would otherwise silently swap
in `modelopt_fp4`); without `--quantization nvfp4_ext`, `override_quantization_method` returns None and vLLM
behaves as if the plugin were not installed. The checkpoint's tensors are validated in vLLM's front-end
process (`maybe_update_config`), so a malformed checkpoint stops the server before any worker starts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from nvfp4_ext.checkpoint.config import FUSED_SHARDS, QuantConfig, parse_quant_config
from nvfp4_ext.errors import CheckpointError, ConfigError

from .validate import checkpoint_modules, validate_checkpoint

__all__ = ["QUANT_NAME", "Nvfp4ExtConfig", "describe_method"]

QUANT_NAME = "nvfp4_ext"
logger = logging.getLogger("nvfp4_ext")

_NOT_QUANTIZED = (
    f"--quantization {QUANT_NAME} needs an NVFP4 checkpoint, but this model has no quantization_config "
    "(config.json) or hf_quant_config.json: quantize it first with `nvfp4-ext quantize SRC DST`"
)
_FP8_SCHEMES = ("fp8", "fp8_channel", "fp8_block")
_NVFP4_SCHEMES = ("nvfp4", "nvfp4_w4a16")


def describe_method(hf_quant_cfg: dict | None) -> str:
    """A short description of a checkpoint's quantization method for error messages."""
    if not hf_quant_cfg:
        return "none (the checkpoint is not quantized)"
    method = hf_quant_cfg.get("quant_method", "?")
    algo = hf_quant_cfg.get("quant_algo") or (hf_quant_cfg.get("quantization") or {}).get("quant_algo")
    fmt = hf_quant_cfg.get("format")
    details = ", ".join(f"{k} {v!r}" for k, v in (("quant_algo", algo), ("format", fmt)) if v)
    return f"{method!r}" + (f" ({details})" if details else "")


class Nvfp4ExtConfig(QuantizationConfig):
    """vLLM QuantizationConfig of nvfp4_ext (see module docstring).

    Args:
        quant: the parsed checkpoint quantization config.
    """

    def __init__(self, quant: QuantConfig | None = None) -> None:
        if quant is None:
            # vLLM builds a config without arguments when the checkpoint has no quantization config at all.
            raise ConfigError(_NOT_QUANTIZED)
        super().__init__()
        self.quant = quant
        # HF module names of the checkpoint, filled in the front-end process and pickled to the workers.
        self.modules: frozenset[str] = frozenset()
        self.prefix_map: tuple[tuple[str, str], ...] = ()

    # ------------------------------------------------------------------------------ vLLM interface
    def get_name(self) -> str:
        return QUANT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # our Triton weight-only kernels; vLLM skips this check on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        # vLLM already attaches config.json's quantization_config or hf_quant_config.json to the model config;
        # an empty list makes an unquantized checkpoint reach __init__, which explains the problem.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Nvfp4ExtConfig:
        clean = {k: v for k, v in config.items() if not k.startswith("_")}
        quant = parse_quant_config(clean, "quantization_config")
        if not quant.is_nvfp4:
            raise ConfigError(
                f"--quantization {QUANT_NAME} serves NVFP4 checkpoints; this checkpoint's quantization is "
                f"{describe_method(clean)} with no NVFP4 layer"
            )
        return cls(quant)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any] | None, user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claim the checkpoint only when the user asked for nvfp4_ext; refuse what we cannot serve."""
        if user_quant != QUANT_NAME:
            return None
        if not hf_quant_cfg:
            raise ConfigError(_NOT_QUANTIZED)
        clean = {k: v for k, v in hf_quant_cfg.items() if not k.startswith("_")}
        try:
            quant = parse_quant_config(clean, "quantization_config")
        except CheckpointError as exc:
            raise ConfigError(
                f"--quantization {QUANT_NAME} cannot serve this checkpoint (quantization method "
                f"{describe_method(clean)}): {exc}"
            ) from None
        if not quant.is_nvfp4:
            raise ConfigError(
                f"--quantization {QUANT_NAME} serves NVFP4 checkpoints (ModelOpt NVFP4, W4A16_NVFP4, "
                f"MIXED_PRECISION with NVFP4 layers, compressed-tensors nvfp4-pack-quantized); this "
                f"checkpoint's quantization method is {describe_method(clean)}; drop --quantization to let "
                "vLLM pick its own"
            )
        return QUANT_NAME

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Validate the checkpoint's NVFP4 tensors (front-end process) and remember its module names."""
        tensors = validate_checkpoint(model_name, self.quant)
        if tensors is not None:
            self.modules = checkpoint_modules(tensors)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        # Exclude lists and layer maps use checkpoint (HF) names; remember how vLLM renamed prefixes so a
        # vLLM layer prefix can be mapped back (e.g. DiffusionGemma's `model.decoder.` -> `model.`).
        prefixes = getattr(hf_to_vllm_mapper, "orig_to_new_prefix", {}) or {}
        self.prefix_map = tuple((new, orig) for orig, new in prefixes.items() if new is not None)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # Layer modules are imported here, in the workers: register() (every process) stays cheap.
        from vllm.model_executor.layers.attention import Attention, MLAAttention
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

        from .linear import Nvfp4ExtFp8LinearMethod, Nvfp4ExtLinearMethod
        from .moe import Nvfp4ExtFusedMoEMethod

        if isinstance(layer, (Attention, MLAAttention)):
            # Loads FP8 KV-cache scales (k_proj.k_scale -> attn.k_scale), as vLLM's ModelOpt does.
            return BaseKVCacheMethod(self)
        if isinstance(layer, LinearBase):
            scheme = self.scheme(prefix)
            if scheme in _NVFP4_SCHEMES:
                return Nvfp4ExtLinearMethod(self, scheme, prefix)
            if scheme in _FP8_SCHEMES:
                return Nvfp4ExtFp8LinearMethod(self, scheme, prefix)
            return UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts):
            scheme = self.scheme(prefix)
            if scheme in _NVFP4_SCHEMES:
                return Nvfp4ExtFusedMoEMethod(self, scheme, prefix, layer.moe_config)
            if scheme != "unquantized":
                raise ConfigError(
                    f"layer {prefix}: {scheme} MoE experts are not supported by {QUANT_NAME} "
                    "(NVFP4 experts, FP8/NVFP4/unquantized linears are)"
                )
            return None
        return None

    # --------------------------------------------------------------------------------- helpers
    def hf_name(self, prefix: str) -> str:
        """The checkpoint name of a vLLM layer prefix (undoing the model's prefix renames)."""
        for new, orig in self.prefix_map:
            if prefix.startswith(new):
                candidate = orig + prefix[len(new) :]
                if not self.modules or any(
                    m == candidate or m.startswith(candidate + ".") for m in self.modules
                ):
                    return candidate
        return prefix

    def scheme(self, prefix: str) -> str:
        """The scheme of a vLLM layer (linear or routed experts) from the checkpoint config."""
        name = self.hf_name(prefix)
        parent, _, leaf = name.rpartition(".")
        shards = getattr(self, "packed_modules_mapping", {}).get(leaf)
        if shards and len(shards) > 1 and leaf not in FUSED_SHARDS and leaf != "experts":
            # A fused layer the model declares (vLLM passes the model's packed_modules_mapping), e.g.
            # Qwen3.5's GDN `in_proj_ba` = in_proj_b + in_proj_a, DeepSeek's `fused_qkv_a_proj`: the
            # checkpoint names the shards, and they must agree (ModelOpt keeps in_proj_a/b BF16 while
            # quantizing in_proj_qkv).
            found = {s: self.quant.scheme_for(f"{parent}.{s}" if parent else s) for s in shards}
            if len(set(found.values())) > 1:
                detail = ", ".join(f"{s}={v}" for s, v in found.items())
                raise ConfigError(
                    f"layer {prefix}: vLLM fuses {', '.join(shards)} into one layer, but the checkpoint "
                    f"quantizes them differently ({detail})"
                )
            return next(iter(found.values()))
        if name.endswith(".experts") and self.quant.scheme_for(name) == "unquantized":
            # Per-expert listings (MIXED_PRECISION / compressed-tensors targets) name the expert projections.
            for child in (f"{name}.0.gate_proj", f"{name}.0.down_proj", f"{name}.gate_up_proj"):
                scheme = self.quant.scheme_for(child)
                if scheme != "unquantized":
                    return scheme
        return self.quant.scheme_for(name)
