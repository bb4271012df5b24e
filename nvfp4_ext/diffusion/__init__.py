"""DiffusionGemma denoising: schedule, policies, fused statistics and a reference driver (pure torch).

Public API (engines use the first two; imports are lazy so `import nvfp4_ext.diffusion` stays cheap)::

    from nvfp4_ext.diffusion import get_policy, DenoiseSettings, fused_denoise_stats, generate
    policy = get_policy("confidence", threshold=0.9)            # or "entropy_bound" (bound), "fixed_k" (k)
    stats = fused_denoise_stats(hidden, embed_weight, temperature, seed=0, embed_scale=hidden_size**0.5)
    result = generate(hf_model, input_ids, policy=policy, stats="fused", seed=0)

Nothing here imports vLLM or SGLang; `generate` imports transformers when called.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "POLICIES",
    "ConfidencePolicy",
    "DenoisePolicy",
    "DenoiseSettings",
    "DenoiseStats",
    "EntropyBoundPolicy",
    "FixedKPolicy",
    "GenerationResult",
    "StabilityTracker",
    "denoise_stats_ref",
    "fused_denoise_stats",
    "generate",
    "get_policy",
    "gumbel_noise",
    "load_diffusion_gemma",
    "policy_from_mapping",
    "temperature",
]

_HOME = {
    "POLICIES": "policies",
    "ConfidencePolicy": "policies",
    "DenoisePolicy": "policies",
    "EntropyBoundPolicy": "policies",
    "FixedKPolicy": "policies",
    "get_policy": "policies",
    "policy_from_mapping": "policies",
    "DenoiseSettings": "schedule",
    "StabilityTracker": "schedule",
    "temperature": "schedule",
    "DenoiseStats": "stats",
    "denoise_stats_ref": "stats",
    "fused_denoise_stats": "stats",
    "gumbel_noise": "stats",
    "GenerationResult": "driver",
    "generate": "driver",
    "load_diffusion_gemma": "loading",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
