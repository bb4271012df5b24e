"""`nvfp4-ext quantize` and `nvfp4-ext eval`: making NVFP4 checkpoints and measuring their accuracy.

Public API::

    from nvfp4_ext.quantize import quantize_checkpoint, dequantize_checkpoint
    quantize_checkpoint(src_dir, dst_dir, recipe="w4a16", scales="mse")   # -> Path of the ModelOpt checkpoint
    dequantize_checkpoint(dst_dir, out_dir)                               # -> plain HF checkpoint, float32
"""

from __future__ import annotations

from nvfp4_ext.quantize.dequantize import QuantizedReader, dequantize_checkpoint
from nvfp4_ext.quantize.plan import DEFAULT_EXCLUDES, OUTPUT_FORMATS, RECIPES
from nvfp4_ext.quantize.quantizer import PROVENANCE_FILE, quantize_checkpoint
from nvfp4_ext.quantize.scales import SCALE_METHODS, quantize_weight

__all__ = [
    "DEFAULT_EXCLUDES",
    "OUTPUT_FORMATS",
    "PROVENANCE_FILE",
    "RECIPES",
    "SCALE_METHODS",
    "QuantizedReader",
    "dequantize_checkpoint",
    "quantize_checkpoint",
    "quantize_weight",
]
