"""`nvfp4-ext quantize` and `nvfp4-ext eval`: making NVFP4 checkpoints and measuring their accuracy.

Public API (imported lazily, so `import nvfp4_ext.quantize.options` and the CLI's `--help` stay cheap)::

    from nvfp4_ext.quantize import quantize_checkpoint, dequantize_checkpoint
    quantize_checkpoint(src_dir, dst_dir, recipe="w4a16", scales="mse")   # -> Path of the ModelOpt checkpoint
    dequantize_checkpoint(dst_dir, out_dir)                               # -> plain HF checkpoint, float32
"""

from __future__ import annotations

from nvfp4_ext.lazy import lazy_getattr

_EXPORTS = {
    "QuantizedReader": "nvfp4_ext.quantize.dequantize",
    "dequantize_checkpoint": "nvfp4_ext.quantize.dequantize",
    "DEFAULT_EXCLUDES": "nvfp4_ext.quantize.plan",
    "OUTPUT_FORMATS": "nvfp4_ext.quantize.options",
    "RECIPES": "nvfp4_ext.quantize.options",
    "SCALE_METHODS": "nvfp4_ext.quantize.options",
    "PROVENANCE_FILE": "nvfp4_ext.quantize.quantizer",
    "quantize_checkpoint": "nvfp4_ext.quantize.quantizer",
    "quantize_weight": "nvfp4_ext.quantize.scales",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
