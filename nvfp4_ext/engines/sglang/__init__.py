"""SGLang adapter of nvfp4_ext. `register()` is the `sglang.srt.plugins` entry point; SGLang calls it in
every process (server, each scheduler/TP rank, detokenizer) before parsing arguments. Nothing here imports
SGLang until `register()` runs; `SGLANG_PLUGINS=<names without nvfp4_ext>` keeps SGLang from calling it.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register `--quantization nvfp4_ext`, the NVFP4 DiffusionGemma model class and the policy-driven
    `Gemma4Renoise` dLLM algorithm with SGLang. Idempotent.

    An SGLang outside `nvfp4_ext.engines.versions.SGLANG_SUPPORTED` exits the process with one message:
    SGLang's plugin loader logs and swallows a plugin's exceptions, and would start without us.
    """
    from nvfp4_ext.engines.sglang.registration import register_all
    from nvfp4_ext.engines.versions import UnsupportedEngineVersion

    try:
        register_all()
    except UnsupportedEngineVersion as exc:
        raise SystemExit(f"error: {exc}") from None
