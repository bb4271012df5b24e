"""The quantizer's option values, in a module without torch so `nvfp4-ext quantize --help` answers at once."""

from __future__ import annotations

from typing import Literal

__all__ = ["OUTPUT_FORMATS", "RECIPES", "SCALE_METHODS", "OutputFormat", "Recipe", "ScaleMethod"]

Recipe = Literal["nvfp4", "w4a16", "mixed"]
RECIPES: tuple[str, ...] = ("nvfp4", "w4a16", "mixed")
OutputFormat = Literal["modelopt", "compressed-tensors"]
OUTPUT_FORMATS: tuple[str, ...] = ("modelopt", "compressed-tensors")
ScaleMethod = Literal["rtn", "four-over-six", "mse"]
SCALE_METHODS: tuple[str, ...] = ("rtn", "four-over-six", "mse")
