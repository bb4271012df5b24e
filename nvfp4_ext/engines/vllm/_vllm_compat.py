"""The places where supported vLLM releases (0.32, 0.33, 0.34) differ, each behind one helper.

Detected by feature, not by version string, so a patch release that back-ports a change works too.
Checked against each release's real code on CPU by tests/test_vllm_versions.py.

- 0.33 changed `SamplingStates.get_top_k_top_p` (a `vocab_size` argument, a third result
  `has_topp_only_rows` that `apply_top_k_top_p` needs). `SamplingStates.apply_top_k_top_p(logits,
  expanded_idx_mapping, idx_mapping_np)` kept its signature in 0.32-0.34, so we call that.
- 0.34 hands `DiffusionSampler.__call__` the sampled hidden states instead of logits: the model state's
  `compute_sample_logits` is the identity and the sampler projects each tile itself with the
  `compute_logits` it was built with (`profile_run` calls the sampler with zero hidden states at startup).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["apply_top_k_top_p", "logits_projection", "uses_top_k_top_p"]


def logits_projection(sampler: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The hidden-states -> logits projection a vLLM >= 0.34 `DiffusionSampler` holds, else None (the
    runner then passes logits to `__call__`)."""
    projection = vars(sampler).get("compute_logits")
    return projection if callable(projection) else None


def apply_top_k_top_p(
    sampling_states: Any, logits: torch.Tensor, expanded_slots: torch.Tensor, slots_np: np.ndarray
) -> torch.Tensor:
    """vLLM's per-request top-k / top-p filter over `logits` (one row per entry of `expanded_slots`).

    Returns `logits` itself when no request in `slots_np` uses top-k or top-p; otherwise fp32 logits
    with the filtered entries at -inf (vLLM filters an fp32 copy too).
    """
    if not uses_top_k_top_p(sampling_states, slots_np):
        return logits
    return sampling_states.apply_top_k_top_p(logits.float(), expanded_slots, slots_np)


def uses_top_k_top_p(sampling_states: Any, slots_np: np.ndarray) -> bool:
    """Whether any request in `slots_np` restricts sampling with top-k or top-p (host arrays, no sync)."""
    top_k_np = sampling_states.top_k.np[slots_np]
    top_p_np = sampling_states.top_p.np[slots_np]
    return not (bool((top_k_np == sampling_states.vocab_size).all()) and bool((top_p_np == 1.0).all()))
