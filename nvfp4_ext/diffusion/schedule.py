"""DiffusionGemma's denoise schedule: settings, temperature, and the stable-and-confident stopping rule.

Reference: transformers 5.19 `generation_diffusion_gemma.py` (LinearTemperatureScheduleLogitsProcessor,
StableAndConfidentStoppingCriteria) and shared/reference/diffusiongemma.md §c. Steps count DOWN as in HF:
`steps_remaining` runs N, N-1, ..., 1, and the first step uses `t_max`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nvfp4_ext.errors import ConfigError

__all__ = ["DenoiseSettings", "StabilityTracker", "is_confident", "temperature"]


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class DenoiseSettings:
    """The schedule and stopping knobs of one generation (defaults = DiffusionGemma's generation_config).

    Args:
        max_denoising_steps: N, the step cap per canvas (>= 1).
        t_min: temperature at the last step (> 0).
        t_max: temperature at the first step (>= t_min).
        stability_threshold: S, how many previous argmax canvases must equal the current one (>= 0).
        confidence_threshold: C, a canvas is confident when its mean entropy is below C (> 0).
    """

    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def __post_init__(self) -> None:
        steps = self.max_denoising_steps
        _require(
            isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            "max_denoising_steps",
            f"must be an integer >= 1, got {steps!r}",
        )
        _require(
            _is_number(self.t_min) and self.t_min > 0, "t_min", f"must be a number > 0, got {self.t_min!r}"
        )
        _require(
            _is_number(self.t_max) and self.t_max >= self.t_min,
            "t_max",
            f"must be a number >= t_min ({self.t_min!r}), got {self.t_max!r}",
        )
        stab = self.stability_threshold
        _require(
            isinstance(stab, int) and not isinstance(stab, bool) and stab >= 0,
            "stability_threshold",
            f"must be an integer >= 0, got {stab!r}",
        )
        _require(
            _is_number(self.confidence_threshold) and self.confidence_threshold > 0,
            "confidence_threshold",
            f"must be a number > 0, got {self.confidence_threshold!r}",
        )

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any], **overrides: Any) -> DenoiseSettings:
        """Settings from a `generation_config.json` dict; keys it lacks keep the defaults; `overrides` win
        (None values are ignored, so CLI flags can be passed straight through)."""
        values = {name: config[name] for name in cls.__dataclass_fields__ if config.get(name) is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: not a denoise setting")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def temperature(steps_remaining: int | torch.Tensor, settings: DenoiseSettings) -> float | torch.Tensor:
    """HF's linear schedule `t_min + (t_max - t_min) * steps_remaining / N`.

    Args:
        steps_remaining: N at the first step down to 1 at the last (an int, or a tensor per row).
    Returns:
        the temperature (a float, or a float32 tensor shaped like `steps_remaining`).
    """
    span = settings.t_max - settings.t_min
    if isinstance(steps_remaining, torch.Tensor):
        return settings.t_min + span * (steps_remaining.float() / settings.max_denoising_steps)
    return settings.t_min + span * (steps_remaining / settings.max_denoising_steps)


def is_confident(entropy: torch.Tensor, confidence_threshold: float) -> torch.Tensor:
    """[B, L] entropies of the tempered distribution -> [B] bool: mean entropy below the threshold."""
    return entropy.mean(dim=-1) < confidence_threshold


class StabilityTracker:
    """HF's stability rule: a row is stable when the `threshold` previous argmax canvases all equal this one.

    Keeps the ring of previous argmax canvases (initialised to -1, so no row is stable before `threshold`
    updates); threshold 0 means always stable. Call `reset()` at each new canvas.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._history: torch.Tensor | None = None

    def reset(self) -> None:
        self._history = None

    def update(self, argmax_canvas: torch.Tensor) -> torch.Tensor:
        """Compare [B, L] `argmax_canvas` with the history, then push it. Returns [B] bool `stable`."""
        batch = argmax_canvas.shape[0]
        if self.threshold == 0:
            return torch.ones(batch, dtype=torch.bool, device=argmax_canvas.device)
        if self._history is None:
            self._history = torch.full(
                (self.threshold, *argmax_canvas.shape),
                -1,
                dtype=argmax_canvas.dtype,
                device=argmax_canvas.device,
            )
        stable = (self._history == argmax_canvas[None]).all(dim=-1).all(dim=0)
        self._history = torch.roll(self._history, shifts=-1, dims=0)
        self._history[-1] = argmax_canvas
        return stable
