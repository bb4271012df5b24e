"""`QuantConfig`: a checkpoint's quantization config normalized across ModelOpt and compressed-tensors, and
the per-module scheme resolution (excludes, MIXED_PRECISION layers, compressed-tensors targets). Pure python.

Parsing the config files into a `QuantConfig` lives in `nvfp4_ext.checkpoint.config`.

Module names are Hugging Face names of linear/expert modules without the `.weight` suffix, e.g.
`model.layers.0.self_attn.q_proj`, `model.layers.0.mlp.experts.3.gate_proj` (per-expert) or
`model.layers.0.mlp.experts.gate_up_proj` (a fused 3-D expert tensor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from nvfp4_ext.checkpoint.names import (
    FUSED_EXPERT,
    FUSED_SHARDS,
    PatternMatcher,
    fused_shards,
    pattern_matches,
    related_names,
)
from nvfp4_ext.errors import CheckpointError

__all__ = [
    "MIXED_PRECISION",
    "MODELOPT_ALGOS",
    "NVFP4_FORMAT",
    "NVFP4_SCHEMES",
    "SCHEMES",
    "QuantConfig",
    "Scheme",
]

Scheme = Literal["nvfp4", "nvfp4_w4a16", "fp8", "fp8_channel", "fp8_block", "unquantized"]
SCHEMES: tuple[str, ...] = ("nvfp4", "nvfp4_w4a16", "fp8", "fp8_channel", "fp8_block", "unquantized")
NVFP4_SCHEMES: tuple[str, ...] = ("nvfp4", "nvfp4_w4a16")

# ModelOpt quant_algo -> scheme. MIXED_PRECISION is handled separately (per-layer algos from this table).
MODELOPT_ALGOS: dict[str, str] = {
    "NVFP4": "nvfp4",
    "W4A16_NVFP4": "nvfp4_w4a16",
    "FP8": "fp8",
    "FP8_PER_CHANNEL_PER_TOKEN": "fp8_channel",
    "FP8_PB_WO": "fp8_block",
}
MIXED_PRECISION = "MIXED_PRECISION"
NVFP4_FORMAT = "nvfp4-pack-quantized"
CT_FP8_FORMATS = ("float-quantized", "naive-quantized")
CT_MIXED_FORMAT = "mixed-precision"


# ------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's quantization config, normalized across ModelOpt and compressed-tensors forms.

    Attributes:
        producer: "modelopt" or "compressed-tensors".
        quant_algo: ModelOpt algo ("NVFP4", "W4A16_NVFP4", "MIXED_PRECISION", "FP8", ...) or the
            compressed-tensors format ("nvfp4-pack-quantized", "float-quantized", "mixed-precision").
        global_scale_convention: how NVFP4 global scales are stored ("modelopt" multiplier or
            "compressed_tensors" divisor); see `nvfp4_ext.format.global_multiplier`.
        group_size: NVFP4 block size (16).
        exclude: patterns of modules left unquantized (see `pattern_matches`).
        kv_cache_algo: "FP8" when the KV cache is quantized, else None.
        raw: the config dict as found.
        source: the file it came from ("config.json", "hf_quant_config.json" or "<dict>").
        default_scheme: scheme of modules not excluded and not otherwise listed.
        layer_schemes: MIXED_PRECISION per-module schemes (module -> scheme); unlisted -> unquantized.
        target_schemes: compressed-tensors (targets, scheme) pairs in config_groups order.
    """

    producer: Literal["modelopt", "compressed-tensors"]
    quant_algo: str
    global_scale_convention: Literal["modelopt", "compressed_tensors"]
    group_size: int
    exclude: tuple[str, ...]
    kv_cache_algo: str | None
    raw: dict = field(repr=False, compare=False)
    source: str = "<dict>"
    default_scheme: str = "unquantized"
    layer_schemes: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    target_schemes: tuple[tuple[tuple[str, ...], str], ...] = ()

    @cached_property
    def _exclude_matcher(self) -> PatternMatcher:
        return PatternMatcher(self.exclude)

    def excluded_by(self, module: str) -> str | None:
        """The exclude/ignore pattern that keeps `module` unquantized, or None."""
        for name in related_names(module):
            pattern = self._exclude_matcher.first_match(name)
            if pattern is not None:
                return pattern
        return None

    def scheme_for(self, module: str) -> Scheme:
        """The scheme of a linear/expert module (HF name without `.weight`).

        Raises:
            CheckpointError: the shards of a fused module are listed with different schemes.
        """
        if self.excluded_by(module) is not None:
            return "unquantized"
        if self.quant_algo == MIXED_PRECISION:
            return self._mixed_scheme(module)  # type: ignore[return-value]
        if self.producer == "compressed-tensors":
            return self._target_scheme(module)  # type: ignore[return-value]
        return self.default_scheme  # type: ignore[return-value]

    def _mixed_scheme(self, module: str) -> str:
        layers = self.layer_schemes
        if module in layers:
            return layers[module]
        found: dict[str, str] = {}
        shards = fused_shards(module)
        if len(shards) > 1:  # a fused module: every listed shard must agree
            found.update({s: layers[s] for s in shards if s in layers})
        names = related_names(module)[1:]
        found.update({n: layers[n] for n in names if n in layers and n not in shards})
        fused = FUSED_EXPERT.match(module)
        if fused:  # fused 3-D expert tensor listed per expert: experts.{e}.gate_proj / up_proj / down_proj
            projs = FUSED_SHARDS.get(fused["proj"], (fused["proj"],))
            pattern = re.compile(rf"^{re.escape(fused['parent'])}\.\d+\.({'|'.join(projs)})$")
            found.update({k: v for k, v in layers.items() if pattern.match(k)})
        if not found:
            found.update(self._ancestor_scheme(module))
        schemes = set(found.values())
        if len(schemes) > 1:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(found.items()))
            raise CheckpointError(
                f"field quantized_layers: the shards of {module} have different schemes ({detail}); "
                "a fused module needs one scheme",
                file=self.source,
            )
        return schemes.pop() if schemes else "unquantized"

    def _ancestor_scheme(self, module: str) -> dict[str, str]:
        parts = module.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in self.layer_schemes:
                return {prefix: self.layer_schemes[prefix]}
        return {}

    def _target_scheme(self, module: str) -> str:
        match = self._target_match(module)
        return match[1] if match else "unquantized"

    def _target_match(self, module: str) -> tuple[str, str] | None:
        """(target kind, scheme) of the compressed-tensors target that covers `module`, or None."""
        # compressed-tensors precedence: exact names, then regexes, then class names such as "Linear".
        for kind in ("name", "regex", "class"):
            for targets, scheme in self.target_schemes:
                for target in targets:
                    if _target_kind(target) == kind and _target_matches(target, module):
                        return kind, scheme
        return None

    def quantized_by_targets(self, module: str) -> bool:
        """Whether a compressed-tensors target (name, regex or class such as "Linear") covers `module`.
        compressed-tensors quantizes only the nn.Linear (and nn.Embedding) modules its targets match
        (`apply_quantization_config`), so for a module of another kind the stored tensors decide: Qwen3.5's
        GDN `conv1d` (an nn.Conv1d) stays BF16 under "Linear" or under `re:.*linear_attn.*`."""
        if self.producer != "compressed-tensors" or self.excluded_by(module) is not None:
            return False
        return self._target_match(module) is not None

    @property
    def is_nvfp4(self) -> bool:
        """Whether any module can be NVFP4 (W4A4 or W4A16)."""
        schemes = {self.default_scheme, *self.layer_schemes.values(), *(s for _, s in self.target_schemes)}
        return bool(schemes & set(NVFP4_SCHEMES))


def _target_kind(target: str) -> str:
    if target.startswith("re:"):
        return "regex"
    if "." not in target and target[:1].isupper():
        return "class"
    return "name"


def _target_matches(target: str, module: str) -> bool:
    kind = _target_kind(target)
    if kind == "class":  # class names (Linear, *Experts) cover every linear/expert module we are asked about
        return True
    if kind == "regex":
        return re.match(target[3:], module) is not None
    return pattern_matches(target, module)
