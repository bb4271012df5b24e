"""Checkpoint discovery, lazy tensor reading, validation and `nvfp4-ext inspect`.

Public names (imported lazily, so `import nvfp4_ext.checkpoint` stays cheap):
  * `Checkpoint` - `Checkpoint.open(model_dir)`: `.quant_config`, `.tensor_names()`, `.tensor_info(name)`,
    `.get(name)`, `.modules()`, `.module(name)`, `.dequantized_weight(module)`;
  * `ModuleRecord`, `TensorInfo`, `QuantConfig`, `Scheme`;
  * `find_quant_config`, `parse_quant_config`, `fused_shards`, `fused_name`, `group_fused`;
  * `validate_checkpoint`, `inspect_checkpoint`.
"""

from __future__ import annotations

from nvfp4_ext.lazy import lazy_getattr

_EXPORTS = {
    "Checkpoint": "nvfp4_ext.checkpoint.reader",
    "ModuleRecord": "nvfp4_ext.checkpoint.modules",
    "TensorInfo": "nvfp4_ext.checkpoint.safetensors_file",
    "QuantConfig": "nvfp4_ext.checkpoint.config",
    "Scheme": "nvfp4_ext.checkpoint.config",
    "SCHEMES": "nvfp4_ext.checkpoint.config",
    "find_quant_config": "nvfp4_ext.checkpoint.config",
    "parse_quant_config": "nvfp4_ext.checkpoint.config",
    "fused_shards": "nvfp4_ext.checkpoint.names",
    "fused_name": "nvfp4_ext.checkpoint.names",
    "group_fused": "nvfp4_ext.checkpoint.names",
    "validate_checkpoint": "nvfp4_ext.checkpoint.validate",
    "inspect_checkpoint": "nvfp4_ext.checkpoint.inspect",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
