"""SGLang QuantizationConfig of nvfp4_ext: claims ModelOpt / compressed-tensors NVFP4 and mixed checkpoints
when the user passes `--quantization nvfp4_ext`, and hands out our linear and fused-MoE methods.

SGLang resolves `--quantization` against the checkpoint in `ModelConfig._verify_quantization`: it walks
`QUANTIZATION_METHODS` in insertion order and the first `override_quantization_method` that answers replaces
the user's choice. Its "modelopt" entry answers "modelopt_fp4" for every NVFP4 checkpoint, whatever the
user asked for, so `register()` puts this class first and our override answers "nvfp4_ext" -- only when
the user asked for it. Everyone else keeps SGLang's behaviour (shared/reference/sglang-integration.md §2.4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from nvfp4_ext.checkpoint.config import QuantConfig, parse_quant_config
from nvfp4_ext.errors import CheckpointError, ConfigError
from nvfp4_ext.format import FP8_BLOCK

__all__ = ["QUANT_NAME", "Nvfp4ExtConfig", "checkpoint_is_claimable", "declared_hidden_activation"]

logger = logging.getLogger("nvfp4_ext")

QUANT_NAME = "nvfp4_ext"
# quant_method values SGLang's checkpoint parsing produces for the formats we serve.
_CLAIMABLE_METHODS = ("modelopt", "modelopt_fp4", "modelopt_mixed", "modelopt_fp8", "compressed-tensors")
# Keys SGLang's get_quant_config adds to the checkpoint dict before from_config (not part of the format).
_SGLANG_EXTRA_KEYS = ("packed_modules_mapping", "hf_config", "requantization_method")


def checkpoint_is_claimable(hf_quant_cfg: dict[str, Any] | None) -> bool:
    """Whether a checkpoint quantization config (as SGLang parsed it) is one nvfp4_ext serves: NVFP4
    somewhere (W4A4 or W4A16), in ModelOpt flat/legacy/mixed or compressed-tensors form."""
    if not isinstance(hf_quant_cfg, dict):
        return False
    method = str(hf_quant_cfg.get("quant_method", "")).lower()
    if method not in _CLAIMABLE_METHODS:
        return False
    try:
        parsed = parse_quant_config({k: v for k, v in hf_quant_cfg.items() if k not in _SGLANG_EXTRA_KEYS})
    except CheckpointError:
        # SGLang rewrites quant_method ("modelopt_fp4") in its parsed copy; its algo field still decides.
        algo = str(hf_quant_cfg.get("quant_algo", "")).upper()
        return "FP4" in algo or algo == "MIXED_PRECISION"
    return parsed.is_nvfp4


def _identity(name: str) -> str:
    return name


def declared_hidden_activation(hf_config: Any) -> str | None:
    """The MLP/expert activation the checkpoint's HF config declares (`hidden_activation`, read from
    `text_config` for multimodal configs such as Gemma 4's), or None when the config names none."""
    if hf_config is None:
        return None
    text_config = getattr(hf_config, "text_config", None)
    for candidate in (text_config, hf_config):
        activation = getattr(candidate, "hidden_activation", None)
        if isinstance(activation, str):
            return activation
    return None


class Nvfp4ExtConfig(QuantizationConfig):
    """`--quantization nvfp4_ext`: NVFP4 (W4A4/W4A16) and FP8 layers through nvfp4_ext's kernels.

    Args:
        quant: the checkpoint's parsed quantization config.
        packed_modules_mapping: SGLang's fused-module table of the model class (qkv_proj -> q/k/v ...).
    """

    def __init__(
        self,
        quant: QuantConfig,
        packed_modules_mapping: dict[str, list[str]] | None = None,
        hidden_activation: str | None = None,
    ) -> None:
        super().__init__()
        self.quant = quant
        self.packed_modules_mapping = packed_modules_mapping or {}
        # What the model's HF config declares (None if SGLang handed no config): lets the MoE method tell
        # a model-class default ("gelu") from what the checkpoint's model computes.
        self.hidden_activation = hidden_activation
        self.logged_gelu_tanh_override = False  # the MoE method logs that correction once per model
        # SGLang prefix -> checkpoint (HF) module name; a model class whose prefixes differ from the
        # checkpoint's (DiffusionGemma: model.layers.* vs model.decoder.layers.*) installs its own.
        self.module_name_mapper: Callable[[str], str] = _identity
        # SGLang's fused-linear loaders read the FP8 block shape from the config of 128x128-block layers.
        self.weight_block_size = list(FP8_BLOCK)

    # -------------------------------------------------------------------------------- SGLang interface
    @classmethod
    def get_name(cls) -> str:
        return QUANT_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Our Triton kernels run on Ampere and newer; FP4 tensor cores (sm >= 100) are used when present.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["hf_quant_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Nvfp4ExtConfig:
        """Parse the dict SGLang hands over (config.json's quantization_config or hf_quant_config.json,
        plus SGLang's `packed_modules_mapping` / `hf_config` keys)."""
        packed = config.get("packed_modules_mapping")
        quant = parse_quant_config({k: v for k, v in config.items() if k not in _SGLANG_EXTRA_KEYS})
        if not quant.is_nvfp4:
            raise ConfigError(
                f"--quantization {QUANT_NAME}: the checkpoint's quantization ({quant.quant_algo}) has no "
                f"NVFP4 "
                "layers; serve it with SGLang's own method for that format"
            )
        hidden_activation = declared_hidden_activation(config.get("hf_config"))
        return cls(quant, dict(packed) if isinstance(packed, dict) else None, hidden_activation)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: Any, user_quant: str | None) -> str | None:
        """Claim the checkpoint iff the user asked for nvfp4_ext (None leaves SGLang's choice untouched)."""
        if user_quant == QUANT_NAME and checkpoint_is_claimable(hf_quant_cfg):
            return QUANT_NAME
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        from nvfp4_ext.engines.sglang.linear import Nvfp4ExtFp8LinearMethod, Nvfp4ExtLinearMethod
        from nvfp4_ext.engines.sglang.moe import Nvfp4ExtMoEMethod

        if isinstance(layer, LinearBase):
            scheme = self.linear_scheme(prefix)
            if scheme in ("nvfp4", "nvfp4_w4a16") and prefix.rpartition(".")[2] == "kv_b_proj":
                # SGLang's MLA copies kv_b_proj.weight into w_kc/w_vc after loading and dequantizes only
                # AWQ/FP8/INT8 there, so packed FP4 bytes would reach its bmm at the first request.
                raise ConfigError(
                    f"layer {prefix}: an NVFP4 kv_b_proj is not supported under SGLang (its MLA reads the raw "
                    f"weight into w_kc/w_vc); serve this checkpoint with vLLM (`vllm serve ... --quantization "
                    f"{QUANT_NAME}` dequantizes kv_b_proj), or export it with kv_b_proj kept BF16"
                )
            if scheme in ("nvfp4", "nvfp4_w4a16"):
                return Nvfp4ExtLinearMethod(self, scheme, prefix)
            if scheme.startswith("fp8"):
                return Nvfp4ExtFp8LinearMethod(self, scheme, prefix)
            return UnquantizedLinearMethod()
        if isinstance(layer, FusedMoE):
            scheme = self.moe_scheme(prefix)
            if scheme in ("nvfp4", "nvfp4_w4a16"):
                return Nvfp4ExtMoEMethod(self, scheme, prefix)
            if scheme != "unquantized":
                raise ConfigError(
                    f"layer {prefix}: {scheme} experts are not supported by {QUANT_NAME} (NVFP4 or BF16 only)"
                )
            return None  # SGLang's unquantized fused MoE
        return None

    def get_scaled_act_names(self) -> list[str]:
        return []

    # ------------------------------------------------------------------------------------------ schemes
    def linear_scheme(self, prefix: str) -> str:
        """Scheme of a linear layer by its SGLang prefix; fused layers (qkv_proj) use the model's table."""
        module = self.module_name_mapper(prefix)
        parent, _, leaf = module.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf)
        if shards:
            names = [f"{parent}.{s}" if parent else s for s in shards]
            if self.quant.quant_algo == "MIXED_PRECISION":
                # A per-layer map lists only the shards the checkpoint has (DiffusionGemma's full-attention
                # layers have no v_proj: v = k), so an unlisted shard does not count as unquantized.
                names = [n for n in names if n in self.quant.layer_schemes] or names
            schemes = {self.quant.scheme_for(name) for name in names}
            if len(schemes) > 1:
                raise CheckpointError(
                    f"the shards {shards} of {module} have different quantization schemes {sorted(schemes)}; "
                    "a fused layer needs one scheme",
                    tensor=module,
                )
            return schemes.pop()
        return self.quant.scheme_for(module)

    def moe_scheme(self, prefix: str) -> str:
        """Scheme of a fused-MoE layer (`...experts`), asked through expert 0's gate projection: that name
        also matches checkpoints listing fused `experts.gate_up_proj` tensors."""
        return self.quant.scheme_for(f"{self.module_name_mapper(prefix)}.0.gate_proj")
