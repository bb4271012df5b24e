"""vLLM adapter: `register()` is the `vllm.general_plugins` entry point (see pyproject.toml).

vLLM runs general plugins in every process (API server, engine core, each worker, the model-inspection
subprocess), so `register()` is idempotent, imports vLLM only when called and does no CUDA work. The classes
live in `config`, `linear`, `moe` (and `diffusion_gemma`); `VLLM_PLUGINS` without `nvfp4_ext` skips all of it.
"""

from __future__ import annotations

import importlib.util
import logging

__all__ = ["register"]

_REGISTERED = False
logger = logging.getLogger("nvfp4_ext")


def register() -> None:
    """Register the `nvfp4_ext` quantization method (and our DiffusionGemma model class) with vLLM.

    Raises:
        UnsupportedEngineVersion: vLLM is outside `nvfp4_ext.engines.versions.VLLM_SUPPORTED`.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import vllm

    from nvfp4_ext.engines.versions import VLLM_SUPPORTED, require_supported_version

    require_supported_version(VLLM_SUPPORTED, vllm.__version__)
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from nvfp4_ext import __version__

    from .config import QUANT_NAME, Nvfp4ExtConfig

    if QUANT_NAME not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_NAME)(Nvfp4ExtConfig)
    # Registered lazily by "module:Class" so vLLM imports it only when such a model is served; skipped when
    # the module is not part of this installation, so a missing file never breaks vLLM.
    if importlib.util.find_spec(f"{__name__}.diffusion_gemma") is not None:
        from vllm import ModelRegistry

        ModelRegistry.register_model(
            "DiffusionGemmaForBlockDiffusion", f"{__name__}.diffusion_gemma:Nvfp4ExtDiffusionGemma"
        )
        # Bad `diffusion_policy*` extra_args must be an HTTP 400 in the API process, not an engine error later.
        from .diffusion_gemma import install_admission_validation

        install_admission_validation()
    _REGISTERED = True
    _share_vllm_log_handlers()
    logger.info("nvfp4_ext %s registered (--quantization %s)", __version__, QUANT_NAME)


class _ForwardToVllm(logging.Handler):
    """Hands our records to the `vllm.nvfp4_ext` logger, i.e. to the handlers vLLM configures (lazily)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm.nvfp4_ext").handle(record)


def _share_vllm_log_handlers() -> None:
    """Print our log lines (registration, backend per layer kind) through vLLM's console handlers."""
    if any(isinstance(h, _ForwardToVllm) for h in logger.handlers):
        return
    logger.addHandler(_ForwardToVllm())
    logger.setLevel(logging.INFO)
    logger.propagate = False
