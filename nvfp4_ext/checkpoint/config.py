"""Quantization-config discovery and parsing into `QuantConfig` (pure python, no torch).

Real NVFP4 checkpoints describe their quantization in one of these forms, all parsed into one `QuantConfig`:

  * config.json `quantization_config`, flat ModelOpt style: `quant_method: "modelopt"`, `quant_algo`,
    `group_size`, `ignore` / `exclude_modules`, `kv_cache_scheme` / `kv_cache_quant_algo`;
  * legacy `hf_quant_config.json`: `{"producer": {"name": "modelopt"}, "quantization": {"quant_algo", ...}}`;
  * `quant_algo: "MIXED_PRECISION"` with a map `quantized_layers: {module: {"quant_algo": ...}}` (both forms);
  * compressed-tensors: `quant_method: "compressed-tensors"`, `config_groups` (targets + weights/activations
    args) with format `nvfp4-pack-quantized` (NVFP4) or `float-quantized` (FP8), and `ignore`.

Per-module scheme resolution is `QuantConfig.scheme_for` (`nvfp4_ext.checkpoint.quant_config`); the names
below are re-exported here as the public entry point.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from nvfp4_ext.checkpoint.names import FUSED_SHARDS, fused_name, fused_shards, group_fused, pattern_matches
from nvfp4_ext.checkpoint.quant_config import (
    CT_FP8_FORMATS,
    CT_MIXED_FORMAT,
    MIXED_PRECISION,
    MODELOPT_ALGOS,
    NVFP4_FORMAT,
    NVFP4_SCHEMES,
    SCHEMES,
    QuantConfig,
    Scheme,
)
from nvfp4_ext.errors import CheckpointError

__all__ = [
    "FUSED_SHARDS",
    "MIXED_PRECISION",
    "NVFP4_SCHEMES",
    "SCHEMES",
    "QuantConfig",
    "Scheme",
    "find_quant_config",
    "fused_name",
    "fused_shards",
    "group_fused",
    "parse_quant_config",
    "pattern_matches",
]


# ------------------------------------------------------------------------------------------- parsing
def _fail(source: str, fieldname: str, message: str) -> CheckpointError:
    return CheckpointError(f"field {fieldname}: {message}", file=source)


def _str_list(value: Any, source: str, fieldname: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, fieldname, f"expected a list of module-name patterns, got {value!r}")
    for pattern in value:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise _fail(source, fieldname, f"invalid regular expression {pattern!r}: {exc}") from None
    return tuple(value)


def _modelopt_scheme(algo: Any, source: str, fieldname: str) -> str:
    if not isinstance(algo, str):
        raise _fail(source, fieldname, f"expected a string, got {algo!r}")
    scheme = MODELOPT_ALGOS.get(algo.upper())
    if scheme is None:
        raise _fail(
            source,
            fieldname,
            f"unknown quant_algo {algo!r} (supported: {', '.join(MODELOPT_ALGOS)}, {MIXED_PRECISION})",
        )
    return scheme


def _group_size(value: Any, source: str, fieldname: str, scheme: str) -> int:
    if value is None:
        return 16
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(source, fieldname, f"expected an integer, got {value!r}")
    if scheme in NVFP4_SCHEMES and value != 16:
        raise _fail(source, fieldname, f"NVFP4 needs group_size 16, got {value}")
    return value


def _kv_algo(q: dict, source: str, prefix: str) -> str | None:
    algo = q.get("kv_cache_quant_algo")
    if isinstance(algo, str) and algo:
        return algo.upper()
    scheme = q.get("kv_cache_scheme")
    if scheme is None or algo is not None and not isinstance(algo, str):
        return None
    if isinstance(scheme, str):
        return scheme.upper()
    if isinstance(scheme, dict):
        if scheme.get("num_bits") == 8 and scheme.get("type", "float") == "float":
            return "FP8"
        raise _fail(source, f"{prefix}kv_cache_scheme", f"unsupported KV cache scheme {scheme!r}")
    raise _fail(source, f"{prefix}kv_cache_scheme", f"expected an object, got {scheme!r}")


def _parse_modelopt(q: dict, cfg: dict, source: str, prefix: str) -> QuantConfig:
    algo = q.get("quant_algo")
    if algo is None and _kv_algo(q, source, prefix) is not None:
        algo = "NONE"  # a KV-cache-only export: the weights stay unquantized
    if algo is None:
        raise _fail(source, f"{prefix}quant_algo", "missing")
    if not isinstance(algo, str):
        raise _fail(source, f"{prefix}quant_algo", f"expected a string, got {algo!r}")
    algo = algo.upper()
    exclude = _str_list(q.get("exclude_modules", q.get("ignore")), source, f"{prefix}exclude_modules")
    layer_schemes: dict[str, str] = {}
    if algo == MIXED_PRECISION:
        default = "unquantized"
        layers = q.get("quantized_layers", cfg.get("quantized_layers"))
        if not isinstance(layers, dict):
            raise _fail(
                source, f"{prefix}quantized_layers", f"MIXED_PRECISION needs a module map, got {layers!r}"
            )
        for module, spec in layers.items():
            where = f'{prefix}quantized_layers["{module}"]'
            if not isinstance(spec, dict):
                raise _fail(source, where, f"expected an object with quant_algo, got {spec!r}")
            scheme = _modelopt_scheme(spec.get("quant_algo"), source, f"{where}.quant_algo")
            _group_size(spec.get("group_size"), source, f"{where}.group_size", scheme)
            layer_schemes[module] = scheme
    elif algo == "NONE":
        default = "unquantized"
    else:
        default = _modelopt_scheme(algo, source, f"{prefix}quant_algo")
        # vLLM: an NVFP4 config whose groups all lack input activations is weight-only.
        groups = q.get("config_groups")
        if (
            default == "nvfp4"
            and isinstance(groups, dict)
            and groups
            and all(isinstance(g, dict) and g.get("input_activations") is None for g in groups.values())
        ):
            default = "nvfp4_w4a16"
    group_size = _group_size(q.get("group_size"), source, f"{prefix}group_size", default)
    return QuantConfig(
        producer="modelopt",
        quant_algo=algo,
        global_scale_convention="modelopt",
        group_size=group_size,
        exclude=exclude,
        kv_cache_algo=_kv_algo(q, source, prefix),
        raw=cfg,
        source=source,
        default_scheme=default,
        layer_schemes=layer_schemes,
    )


def _ct_group_scheme(group: dict, fmt: str | None, source: str, where: str) -> str:
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise _fail(source, f"{where}.weights", f"expected quantization args, got {weights!r}")
    fmt = group.get("format", fmt)
    bits, kind = weights.get("num_bits"), weights.get("type", "int")
    strategy = weights.get("strategy")
    acts = group.get("input_activations")
    if bits == 4 and kind == "float":
        if fmt not in (NVFP4_FORMAT, None):
            raise _fail(
                source, f"{where}.format", f"4-bit float weights need format {NVFP4_FORMAT!r}, got {fmt!r}"
            )
        if strategy not in ("tensor_group", "group") or weights.get("group_size", 16) != 16:
            raise _fail(
                source,
                f"{where}.weights",
                f"NVFP4 needs strategy tensor_group with group_size 16, got strategy={strategy!r} "
                f"group_size={weights.get('group_size')!r}",
            )
        return "nvfp4_w4a16" if acts is None else "nvfp4"
    if bits == 8 and kind == "float":
        if fmt not in (*CT_FP8_FORMATS, None):
            raise _fail(source, f"{where}.format", f"FP8 weights need format float-quantized, got {fmt!r}")
        by_strategy = {"tensor": "fp8", "channel": "fp8_channel", "block": "fp8_block"}
        if strategy not in by_strategy:
            raise _fail(source, f"{where}.weights.strategy", f"unsupported FP8 strategy {strategy!r}")
        return by_strategy[strategy]
    raise _fail(
        source,
        f"{where}.weights",
        f"unsupported weights (num_bits={bits!r}, type={kind!r}); nvfp4_ext reads NVFP4 and FP8 only",
    )


def _parse_compressed_tensors(q: dict, source: str, prefix: str) -> QuantConfig:
    fmt = q.get("format")
    known = (NVFP4_FORMAT, *CT_FP8_FORMATS, CT_MIXED_FORMAT, None)
    if fmt not in known:
        raise _fail(
            source,
            f"{prefix}format",
            f"unknown format {fmt!r} (supported: {', '.join(str(k) for k in known[:-1])})",
        )
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _fail(source, f"{prefix}config_groups", f"expected a non-empty object, got {groups!r}")
    target_schemes = []
    for name, group in groups.items():
        where = f"{prefix}config_groups.{name}"
        if not isinstance(group, dict):
            raise _fail(source, where, f"expected an object, got {group!r}")
        targets = _str_list(group.get("targets"), source, f"{where}.targets")
        if not targets:
            raise _fail(source, f"{where}.targets", "missing or empty")
        target_schemes.append((targets, _ct_group_scheme(group, fmt, source, where)))
    return QuantConfig(
        producer="compressed-tensors",
        quant_algo=fmt or NVFP4_FORMAT,
        global_scale_convention="compressed_tensors",
        group_size=16,
        exclude=_str_list(q.get("ignore"), source, f"{prefix}ignore"),
        kv_cache_algo=_kv_algo(q, source, prefix),
        raw=q,
        source=source,
        default_scheme="unquantized",
        target_schemes=tuple(target_schemes),
    )


def parse_quant_config(cfg: dict, source: str = "<dict>") -> QuantConfig:
    """Parse a quantization config in any supported form.

    Args:
        cfg: a `quantization_config` dict, a config.json dict holding one, or an hf_quant_config.json dict.
        source: file name used in error messages.
    Raises:
        CheckpointError: unknown quant_method/quant_algo/format, or malformed fields (names the field).
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"expected a JSON object, got {type(cfg).__name__}", file=source)
    if isinstance(cfg.get("quantization_config"), dict):
        return parse_quant_config(cfg["quantization_config"], source)
    if "quantization" in cfg and ("producer" in cfg or "quant_method" not in cfg):
        q = cfg["quantization"]
        if not isinstance(q, dict):
            raise _fail(source, "quantization", f"expected an object, got {q!r}")
        producer = cfg.get("producer", {})
        name = producer.get("name", "modelopt") if isinstance(producer, dict) else producer
        if str(name).lower() != "modelopt":
            raise _fail(source, "producer.name", f"unknown producer {name!r} (expected modelopt)")
        return _parse_modelopt(q, cfg, source, "quantization.")
    method = cfg.get("quant_method")
    prefix = "quantization_config." if Path(source).name == "config.json" else ""
    if isinstance(method, str) and method.lower().startswith("modelopt"):
        return _parse_modelopt(cfg, cfg, source, prefix)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(cfg, source, prefix)
    if method is None and "quant_algo" in cfg:
        return _parse_modelopt(cfg, cfg, source, prefix)
    raise _fail(
        source,
        f"{prefix}quant_method",
        f"unsupported quant_method {method!r} (expected modelopt or compressed-tensors)",
    )


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read: {exc}", file=str(path)) from None


def find_quant_config(model_dir: str | os.PathLike) -> QuantConfig | None:
    """Find and parse a model directory's quantization config.

    config.json's `quantization_config` wins; otherwise `hf_quant_config.json`. Returns None when the
    model is unquantized (neither present).

    Raises:
        CheckpointError: the directory is missing, a JSON file is unreadable or the config is invalid.
    """
    root = Path(model_dir)
    if not root.is_dir():
        problem = (
            "is not a directory (expected a model directory)"
            if root.exists()
            else "model directory not found"
        )
        raise CheckpointError(problem, file=str(root))
    config_path = root / "config.json"
    if config_path.is_file():
        config = _load_json(config_path)
        if not isinstance(config, dict):
            raise CheckpointError("expected a JSON object", file=str(config_path))
        q = config.get("quantization_config")
        if q is not None:
            if not isinstance(q, dict):
                raise _fail(str(config_path), "quantization_config", f"expected an object, got {q!r}")
            return parse_quant_config(q, str(config_path))
    legacy = root / "hf_quant_config.json"
    if legacy.is_file():
        return parse_quant_config(_load_json(legacy), str(legacy))
    return None
