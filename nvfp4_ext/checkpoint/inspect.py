"""`nvfp4-ext inspect MODEL_DIR [--json] [--gpu 9.0]`: a checkpoint's per-module precision table.

One row per linear/expert module (name, scheme, shape, params, bytes, bits/param, global-scale range,
findings), a summary per precision with the effective bits/param, and which layers stay unquantized and
why. `--json` prints the stable contract other tools script against:

    {"modules": [{"name", "scheme", "shape", "params", "bytes", "bits_per_param", "findings": [...], ...}],
     "summary": {"by_scheme": {SCHEME: {"params": int, "bytes": int, ...}}, "bits_per_param": float, ...}}

The checkpoint is validated first (a bad one exits 2 with one `error:` line). Weights are scanned one
expert / row chunk at a time for all-zero NVFP4 blocks and NaN/inf values (`--no-scan` skips that).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from typing import TYPE_CHECKING

from nvfp4_ext.checkpoint.config import NVFP4_SCHEMES, SCHEMES
from nvfp4_ext.checkpoint.names import group_fused
from nvfp4_ext.errors import ConfigError

if TYPE_CHECKING:  # torch and the reader load inside the functions: `nvfp4-ext inspect --help` stays instant
    from nvfp4_ext.checkpoint.modules import ModuleRecord
    from nvfp4_ext.checkpoint.reader import Checkpoint

__all__ = ["FUSED_SCALE_RATIO", "add_arguments", "format_report", "inspect_checkpoint", "run"]

FUSED_SCALE_RATIO = 2.0  # shard global scales further apart than this lose precision once fused
_CHUNK_BYTES = 64 * 1024 * 1024
_ZERO_BLOCK_MASK = 0x7777777777777777
_EXPERT_ROW = re.compile(r"\.experts\.\d+\.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nvfp4-ext inspect`."""
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="checkpoint directory (config.json + safetensors)"
    )
    parser.add_argument("--json", action="store_true", help="print the machine-readable report")
    parser.add_argument(
        "--gpu",
        metavar="MAJOR.MINOR",
        help="also show the backend per layer kind on this CUDA capability, e.g. 9.0",
    )
    parser.add_argument(
        "--no-scan", action="store_true", help="skip reading weights (all-zero blocks, NaN checks)"
    )


def _parse_capability(text: str) -> tuple[int, int] | None:
    if text.lower() == "cpu":
        return None
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not match:
        raise ConfigError(f"--gpu: expected a CUDA capability MAJOR.MINOR such as 9.0 (or cpu), got {text!r}")
    return int(match[1]), int(match[2])


# ------------------------------------------------------------------------------------------- scanning
def _row_chunks(ckpt: Checkpoint, name: str):
    info = ckpt.tensor_info(name)
    if not info.shape:
        yield ckpt.get(name)
        return
    row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, info.shape[0], step):
        yield ckpt.get_rows(name, start, start + step)


def _scan(ckpt: Checkpoint, record: ModuleRecord) -> list[str]:
    """Findings that need the weight data: all-zero NVFP4 blocks, NaN/inf values."""
    import torch

    findings = []
    weight = record.tensors["weight"]
    if record.scheme in NVFP4_SCHEMES:
        zero_blocks = 0
        for chunk in _row_chunks(ckpt, weight):
            # 8 bytes = one 16-element block, read as one int64; 0x77 per byte drops the sign bits
            blocks = chunk.reshape(-1, 8).contiguous().view(torch.int64)
            zero_blocks += int((blocks & _ZERO_BLOCK_MASK).eq(0).sum())
        if zero_blocks:
            findings.append(f"{zero_blocks} all-zero blocks")
        return findings
    nan = inf = 0
    for chunk in _row_chunks(ckpt, weight):
        values = chunk.float()
        nan += int(torch.isnan(values).sum())
        inf += int(torch.isinf(values).sum())
    if nan:
        findings.append(f"NaN ({nan} values)")
    if inf:
        findings.append(f"inf ({inf} values)")
    return findings


def _global_range(ckpt: Checkpoint, record: ModuleRecord) -> tuple[float, float] | None:
    name = record.tensors.get("weight_global")
    if record.scheme not in NVFP4_SCHEMES or name is None:
        return None
    from nvfp4_ext.format import global_multiplier

    convention = ckpt.quant_config.global_scale_convention if ckpt.quant_config else "modelopt"
    multiplier = global_multiplier(ckpt.get(name), convention)
    return float(multiplier.min()), float(multiplier.max())


def _fused_findings(
    records: list[ModuleRecord], ranges: dict[str, tuple[float, float] | None]
) -> dict[str, str]:
    findings = {}
    for fused, shards in group_fused([r.name for r in records]).items():
        scales = [ranges.get(s) for s in shards]
        if any(s is None for s in scales):
            continue
        low, high = min(s[0] for s in scales), max(s[1] for s in scales)
        if low > 0 and high / low > FUSED_SCALE_RATIO:
            message = f"shard global scales of {fused.rsplit('.', 1)[-1]} differ by {high / low:.1f}x"
            findings.update(dict.fromkeys(shards, message))
    return findings


# ------------------------------------------------------------------------------------------- the report
def inspect_checkpoint(model_dir: str, *, scan: bool = True, gpu: str | None = None) -> dict:
    """Validate a checkpoint and build the inspect report (the `--json` document).

    Args:
        model_dir: checkpoint directory.
        scan: read weights to count all-zero blocks and NaN/inf values.
        gpu: CUDA capability "MAJOR.MINOR" (or "cpu"); adds `summary.backends`, the backend of each
            layer kind the checkpoint uses (`nvfp4_ext.dispatch.describe_backends`).
    Raises:
        CheckpointError: the checkpoint is invalid.
        ConfigError: `gpu` is not MAJOR.MINOR.
    """
    capability = _parse_capability(gpu) if gpu is not None else None
    from nvfp4_ext.checkpoint.validate import validate_checkpoint

    ckpt = validate_checkpoint(model_dir)
    records = ckpt.modules()
    ranges = {r.name: _global_range(ckpt, r) for r in records}
    fused = _fused_findings(records, ranges)
    module_tensors: set[str] = set()
    rows = []
    for record in records:
        names = list(record.tensors.values())
        module_tensors.update(names)
        nbytes = sum(ckpt.tensor_info(n).nbytes for n in names)
        findings = ([fused[record.name]] if record.name in fused else []) + (
            _scan(ckpt, record) if scan else []
        )
        row = {
            "name": record.name,
            "scheme": record.scheme,
            "shape": list(record.shape),
            "params": record.params,
            "dtype": ckpt.tensor_info(record.tensors["weight"]).dtype,
            "bytes": nbytes,
            "bits_per_param": round(8 * nbytes / record.params, 4) if record.params else 0.0,
            "findings": findings,
            "global_scale": list(ranges[record.name]) if ranges[record.name] else None,
            "reason": record.reason,
            "file": record.file,
        }
        rows.append(row)
    report = {"modules": rows, "summary": _summary(ckpt, rows, module_tensors)}
    if gpu is not None:
        _add_backends(report, capability, layer_kinds(rows))
    return report


def _summary(ckpt: Checkpoint, rows: list[dict], module_tensors: set[str]) -> dict:
    by_scheme: dict[str, dict[str, int]] = {}
    for scheme in SCHEMES:
        members = [r for r in rows if r["scheme"] == scheme]
        if members:
            by_scheme[scheme] = {
                "params": sum(r["params"] for r in members),
                "bytes": sum(r["bytes"] for r in members),
                "modules": len(members),
            }
    params = sum(r["params"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    reasons: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["reason"]:
            reasons[r["reason"]].append(r["name"])
    others = [ckpt.tensor_info(n) for n in ckpt.tensor_names() if n not in module_tensors]
    cfg = ckpt.quant_config
    summary = {
        "by_scheme": by_scheme,
        "bits_per_param": round(8 * nbytes / params, 4) if params else 0.0,
        "params": params,
        "bytes": nbytes,
        "unquantized_reasons": dict(reasons),
        "other_tensors": {
            "count": len(others),
            "params": sum(i.numel for i in others),
            "bytes": sum(i.nbytes for i in others),
        },  # fmt: skip
        "total_bytes": ckpt.total_bytes(),
        "quant_config": None
        if cfg is None
        else {
            "source": cfg.source,
            "producer": cfg.producer,
            "quant_algo": cfg.quant_algo,
            "kv_cache_algo": cfg.kv_cache_algo,
        },  # fmt: skip
    }
    return summary


def _add_backends(report: dict, capability: tuple[int, int] | None, records_kinds: set[str]) -> None:
    from nvfp4_ext.dispatch import describe_backends, flashinfer_available

    backends = describe_backends(capability)
    report["summary"]["backends"] = {
        "device": "cpu" if capability is None else f"sm_{capability[0]}{capability[1]}",
        "flashinfer": flashinfer_available(),
        "by_layer_kind": {kind: backend for kind, backend in backends.items() if kind in records_kinds},
        "all_layer_kinds": backends,
    }


def layer_kinds(rows: list[dict]) -> set[str]:
    """dispatch.LayerKind values used by the checkpoint's quantized modules."""
    kinds = set()
    for row in rows:
        expert = len(row["shape"]) == 3 or ".experts." in row["name"]
        if row["scheme"] == "nvfp4":
            kinds.add("nvfp4_moe" if expert else "nvfp4_linear")
        elif row["scheme"] == "nvfp4_w4a16":
            kinds.add("nvfp4_w4a16_moe" if expert else "nvfp4_w4a16_linear")
        elif row["scheme"].startswith("fp8"):
            kinds.add("fp8_linear")
    return kinds


# ------------------------------------------------------------------------------------------- text output
def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def _collapse_experts(rows: list[dict]) -> list[dict]:
    """Merge per-expert rows (`experts.{e}.gate_proj`) of one scheme and shape into one terminal row."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (_EXPERT_ROW.sub(".experts.*.", row["name"]), row["scheme"], tuple(row["shape"]))
        groups.setdefault(key, []).append(row)
    merged = []
    for (name, _, _), members in groups.items():
        if len(members) == 1:
            merged.append(members[0])
            continue
        scales = [m["global_scale"] for m in members if m["global_scale"]]
        findings = sorted({f for m in members for f in m["findings"]})
        merged.append({
            **members[0],
            "name": f"{name} (x{len(members)})",
            "params": sum(m["params"] for m in members),
            "bytes": sum(m["bytes"] for m in members),
            "global_scale": [min(s[0] for s in scales), max(s[1] for s in scales)] if scales else None,
            "findings": findings,
        })  # fmt: skip
    return merged


def _table(header: list[str], body: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = []
    for r in [header, *body]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_report(report: dict) -> str:
    """The human-readable table of an `inspect_checkpoint` report."""
    body = []
    for row in _collapse_experts(report["modules"]):
        scale = row["global_scale"]
        scale_text = (
            ""
            if not scale
            else f"{scale[0]:.3g}"
            if scale[0] == scale[1]
            else f"{scale[0]:.3g}..{scale[1]:.3g}"
        )
        body.append([
            row["name"], row["scheme"], "x".join(map(str, row["shape"])), _human(row["params"]),
            _human(row["bytes"]), f"{8 * row['bytes'] / row['params']:.2f}" if row["params"] else "-",
            scale_text, "; ".join(row["findings"]),
        ])  # fmt: skip
    header = ["module", "scheme", "shape", "params", "bytes", "bits/param", "global scale", "findings"]
    lines = _table(header, body, right={3, 4, 5})
    summary = report["summary"]
    lines += ["", "precision summary:"]
    totals = [
        [
            scheme,
            str(v["modules"]),
            _human(v["params"]),
            _human(v["bytes"]),
            f"{8 * v['bytes'] / v['params']:.2f}",
        ]
        for scheme, v in summary["by_scheme"].items()
    ]
    totals.append(["total", str(len(report["modules"])), _human(summary["params"]), _human(summary["bytes"]),
                   f"{summary['bits_per_param']:.2f}"])  # fmt: skip
    lines += [
        "  " + line
        for line in _table(["scheme", "modules", "params", "bytes", "bits/param"], totals, {1, 2, 3, 4})
    ]
    other = summary["other_tensors"]
    lines.append(
        f"  + {other['count']} other tensors (norms, biases, KV scales, integer buffers): "
        f"{_human(other['bytes'])} bytes"
    )
    if summary["unquantized_reasons"]:
        dtypes = sorted({r["dtype"] for r in report["modules"] if r["scheme"] == "unquantized"})
        lines += ["", f"unquantized ({', '.join(dtypes)}) layers and why:"]
        for reason, names in summary["unquantized_reasons"].items():
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} total)" if len(names) > 6 else "")
            lines.append(f"  {reason}: {shown}")
    if "backends" in summary:
        backends = summary["backends"]
        note = "" if backends["flashinfer"] else " (FlashInfer not importable here)"
        lines += ["", f"backends on {backends['device']}{note}:"]
        lines += [f"  {kind}: {backend}" for kind, backend in sorted(backends["by_layer_kind"].items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the table (or `--json`); errors propagate as CheckpointError/ConfigError (exit 2 in the CLI)."""
    report = inspect_checkpoint(args.model_dir, scan=not args.no_scan, gpu=args.gpu)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0
