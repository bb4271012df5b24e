"""What `nvfp4_ext.engines.sglang.register()` does, step by step (each step idempotent).

SGLang 0.5.23 has no registration API for quantization methods, dLLM algorithms or model overrides; it
keeps module-level tables that plugins may mutate in place (shared/reference/sglang-integration.md §2, §4.7,
§5), which is what this module does -- no monkeypatching of functions.
"""

from __future__ import annotations

import logging

__all__ = ["register_all", "registered"]

logger = logging.getLogger("nvfp4_ext")

_REGISTERED = False


def registered() -> bool:
    """Whether `register_all()` completed in this process."""
    return _REGISTERED


def _register_quantization() -> None:
    from sglang.srt.layers import linear as sglang_linear
    from sglang.srt.layers import quantization as sglang_quant
    from sglang.srt.server_args import QUANTIZATION_CHOICES, add_quantization_method_choices

    from nvfp4_ext.engines.sglang.config import QUANT_NAME, Nvfp4ExtConfig

    if QUANT_NAME not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([QUANT_NAME])
    methods = sglang_quant.QUANTIZATION_METHODS
    if next(iter(methods), None) != QUANT_NAME:
        # First in the dict: checkpoint detection walks it in order and the first override wins, so ours
        # must answer before the built-in "modelopt" entry rewrites the user's choice to modelopt_fp4.
        others = [(name, cls) for name, cls in methods.items() if name != QUANT_NAME]
        methods.clear()
        methods[QUANT_NAME] = Nvfp4ExtConfig
        methods.update(others)
    # Our linear methods use SGLang's v2 parameter loaders (fused q/k/v shards, per-shard scales).
    for name in ("Nvfp4ExtLinearMethod", "Nvfp4ExtFp8LinearMethod"):
        if name not in sglang_linear.WEIGHT_LOADER_V2_SUPPORTED:
            sglang_linear.WEIGHT_LOADER_V2_SUPPORTED.append(name)
    # The torch backend runs on SGLang's CPU (AMX) engine too, which only admits listed methods.
    sglang_quant.CPU_QUANTIZATION_METHODS.setdefault(QUANT_NAME, Nvfp4ExtConfig)


def _register_dllm_algorithm() -> None:
    from sglang.srt.dllm import algorithm as sglang_algorithms

    from nvfp4_ext.engines.sglang.dllm import Gemma4Renoise

    # SGLang forces this name for DiffusionGemma (dllm/config.py), so ours replaces the built-in entry.
    sglang_algorithms.algo_name_to_cls["Gemma4Renoise"] = Gemma4Renoise


def _register_model() -> None:
    from sglang.srt.models.registry import ModelRegistry

    from nvfp4_ext.engines.sglang.model import ARCHITECTURE, DiffusionGemmaForBlockDiffusion

    # Registered entries win over SGLang's built-ins in both registry modes (eager and external-package).
    ModelRegistry.models[ARCHITECTURE] = DiffusionGemmaForBlockDiffusion


def register_all() -> None:
    """Run every registration step once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from sglang.version import __version__ as sglang_version

    from nvfp4_ext.engines.versions import SGLANG_SUPPORTED, require_supported_version

    require_supported_version(SGLANG_SUPPORTED, sglang_version)
    _register_quantization()
    _register_dllm_algorithm()
    _register_model()
    _REGISTERED = True
    logger.info(
        "nvfp4_ext: registered --quantization nvfp4_ext, Gemma4Renoise policies and NVFP4 DiffusionGemma"
    )
