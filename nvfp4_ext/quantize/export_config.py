"""The quantization configs a quantized checkpoint carries: ModelOpt (config.json + hf_quant_config.json) or
compressed-tensors (config.json), plus our provenance file `nvfp4_ext_quantize.json`.

ModelOpt flat config.json form (what vLLM >= 0.32 and SGLang read first)::

    {"quant_method": "modelopt", "quant_algo": "NVFP4" | "W4A16_NVFP4" | "MIXED_PRECISION",
     "group_size": 16, "ignore": [...], "exclude_modules": [...],
     "quantized_layers": {"<module>": {"quant_algo": "NVFP4", "group_size": 16}, ...}}   # MIXED only

`ignore` and `exclude_modules` hold the same list (vLLM 0.32 reads `ignore`, 0.33 and ModelOpt
`exclude_modules`). The legacy hf_quant_config.json repeats it under `{"producer", "quantization"}`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence

from nvfp4_ext.quantize.plan import TensorTask

__all__ = ["MODELOPT_ALGO", "compressed_tensors_config", "excluded_modules", "modelopt_configs"]

# Our scheme -> ModelOpt quant_algo.
MODELOPT_ALGO = {"nvfp4": "NVFP4", "nvfp4_w4a16": "W4A16_NVFP4", "fp8": "FP8", "fp8_block": "FP8_PB_WO"}


def _version() -> str:
    try:
        return importlib.metadata.version("nvfp4_ext")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def excluded_modules(tasks: Sequence[TensorTask]) -> list[str]:
    """Modules left in source precision that an engine could otherwise treat as quantized linears."""
    names = {"lm_head"}
    for task in tasks:
        if task.action != "copy" or not task.modules:
            continue
        module = task.modules[0]
        if (
            module.endswith((".gate_up_proj", ".down_proj"))
            and task.source.shape
            and len(task.source.shape) == 3
        ):
            names.add(
                module.rsplit(".", 1)[0]
            )  # a fused expert tensor kept whole: exclude the experts module
        else:
            names.add(module)
    return sorted(names)


def _schemes(tasks: Sequence[TensorTask]) -> dict[str, str]:
    return {module: task.scheme for task in tasks if task.action != "copy" for module in task.modules}


def modelopt_configs(tasks: Sequence[TensorTask]) -> tuple[dict, dict]:
    """(config.json `quantization_config`, hf_quant_config.json) for a ModelOpt unified checkpoint."""
    schemes = _schemes(tasks)
    used = set(schemes.values())
    exclude = excluded_modules(tasks)
    layers: dict[str, dict] = {}
    if len(used) == 1:
        algo = MODELOPT_ALGO[used.pop()]
    else:
        algo = "MIXED_PRECISION"
        for module, scheme in sorted(schemes.items()):
            entry = {"quant_algo": MODELOPT_ALGO[scheme]}
            if scheme.startswith("nvfp4"):
                entry["group_size"] = 16
            layers[module] = entry
    flat: dict = {"quant_method": "modelopt", "quant_algo": algo}
    if algo != "MIXED_PRECISION" and "NVFP4" in algo:
        flat["group_size"] = 16
    flat["ignore"] = exclude
    flat["exclude_modules"] = exclude
    if layers:
        flat["quantized_layers"] = layers
    legacy_q: dict = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": exclude}
    if "NVFP4" in algo or algo == "MIXED_PRECISION":
        legacy_q["group_size"] = 16
    if layers:
        legacy_q["quantized_layers"] = layers
    legacy = {
        "producer": {"name": "modelopt", "version": f"nvfp4_ext-{_version()}"},
        "quantization": legacy_q,
    }
    return flat, legacy


def _ct_group(scheme: str, targets: list[str]) -> dict:
    if scheme.startswith("nvfp4"):
        weights = {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "symmetric": True,
            "dynamic": False,
            "observer": "minmax",
        }
        acts = None
        if scheme == "nvfp4":
            acts = {
                "num_bits": 4,
                "type": "float",
                "strategy": "tensor_group",
                "group_size": 16,
                "symmetric": True,
                "dynamic": "local",
                "observer": "minmax",
            }
        return {
            "targets": targets,
            "weights": weights,
            "input_activations": acts,
            "format": "nvfp4-pack-quantized",
        }
    if scheme == "fp8":
        weights = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
        acts = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    else:  # fp8_block: 128x128 weight blocks, dynamic per-group activations
        weights = {
            "num_bits": 8,
            "type": "float",
            "strategy": "block",
            "block_structure": [128, 128],
            "symmetric": True,
            "dynamic": False,
        }
        acts = {
            "num_bits": 8,
            "type": "float",
            "strategy": "group",
            "group_size": 128,
            "symmetric": True,
            "dynamic": True,
        }
    return {"targets": targets, "weights": weights, "input_activations": acts, "format": "float-quantized"}


def compressed_tensors_config(tasks: Sequence[TensorTask]) -> dict:
    """config.json `quantization_config`, compressed-tensors form (NVFP4 global scales stored reciprocal)."""
    used = sorted(set(_schemes(tasks).values()))
    groups: dict[str, dict] = {}
    if len(used) == 1:
        groups["group_0"] = _ct_group(used[0], ["Linear"])
        fmt = groups["group_0"]["format"]
    else:  # mixed: experts by regex (names and regexes outrank the Linear class target), the rest by class
        for index, scheme in enumerate(used):
            targets = [r"re:.*\.experts(\..*)?$"] if scheme.startswith("nvfp4") else ["Linear"]
            groups[f"group_{index}"] = _ct_group(scheme, targets)
        fmt = "mixed-precision"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": excluded_modules(tasks),
        "kv_cache_scheme": None,
    }
