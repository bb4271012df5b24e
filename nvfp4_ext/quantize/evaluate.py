"""`nvfp4-ext eval REFERENCE_DIR QUANTIZED_DIR`: what quantization cost, per layer and for the whole model.

Per-layer weight SQNR (dB) and relative error for every quantized module (per expert for split experts),
summarized by precision and by layer type; when transformers can run the model on CPU, logit KL divergence,
top-1 agreement and perplexity (see `nvfp4_ext.quantize.model_eval`). Writes report.md, report.json and
sqnr.png (per-layer SQNR coloured by scheme) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from nvfp4_ext.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch loads inside the functions: `nvfp4-ext eval --help` stays instant
    import torch

    from nvfp4_ext.quantize.dequantize import QuantizedReader

__all__ = [
    "add_arguments",
    "evaluate",
    "layer_type",
    "model_name",
    "provenance",
    "run",
    "sqnr_figure",
    "weight_metrics",
]

_EXPERT = re.compile(r"^(?P<parent>.*\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def layer_type(module: str) -> str:
    """Coarse layer type for summaries: experts, attention, mlp or other."""
    parts = set(module.split("."))
    if _EXPERT.match(module) or "experts" in parts:
        return "experts"
    if parts & {"self_attn", "attn", "attention", "cross_attn"}:
        return "attention"
    if parts & {"mlp", "feed_forward", "ffn", "shared_expert", "shared_experts"}:
        return "mlp"
    return "other"


class _ReferenceWeights:
    """Reference weights by module name; per-expert names slice the reference's fused 3-D tensors."""

    def __init__(self, root: Path) -> None:
        from nvfp4_ext.quantize.io import list_source_tensors

        self.tensors = {t.name: t for t in list_source_tensors(root)}

    def _get(self, name: str) -> torch.Tensor:
        from nvfp4_ext.quantize.io import read_tensor

        return read_tensor(self.tensors[name])

    def weight(self, module: str) -> torch.Tensor | None:
        if f"{module}.weight" in self.tensors:
            return self._get(f"{module}.weight").float()
        match = _EXPERT.match(module)
        if match is None:
            return None
        expert, proj = int(match["index"]), match["proj"]
        fused = f"{match['parent']}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        if fused not in self.tensors:
            return None
        w = self._get(fused)[expert].float()
        if proj == "down_proj":
            return w
        half = w.shape[0] // 2
        return w[:half] if proj == "gate_proj" else w[half:]


def _scheme(reader: QuantizedReader, module: str) -> str:
    kind = reader.module_kind(module)
    if kind == "nvfp4":
        has_input = any(f"{module}.{s}" in reader.tensors for s in ("input_scale", "input_global_scale"))
        return "nvfp4" if has_input else "nvfp4_w4a16"
    scale = reader.tensors[f"{module}.weight_scale"].shape
    rows = reader.tensors[f"{module}.weight"].shape[0]
    if len(scale) == 0 or scale == (1,):
        return "fp8"
    if scale in ((rows,), (rows, 1)):
        return "fp8_channel"
    return "fp8_block"  # [ceil(N/128), ceil(K/128)], including a 1x1 grid


def weight_metrics(reference_dir: str | Path, quantized_dir: str | Path) -> list[dict]:
    """SQNR and relative error of every quantized module against the reference weights.

    Raises:
        CheckpointError: a quantized module has no counterpart (or a different shape) in the reference.
    """
    from nvfp4_ext.quantize.dequantize import QuantizedReader

    reference = _ReferenceWeights(Path(reference_dir))
    reader = QuantizedReader(quantized_dir)
    rows = []
    for module in reader.quantized_modules():
        w = reference.weight(module)
        if w is None:
            raise CheckpointError("quantized module has no weight in the reference checkpoint", tensor=module)
        deq = reader.weight(module)
        if deq.shape != w.shape:
            raise CheckpointError(
                f"shape {list(deq.shape)} differs from the reference's {list(w.shape)}", tensor=module
            )
        signal, noise = float(w.square().sum()), float((deq - w).square().sum())
        rows.append(
            {
                "module": module,
                "scheme": _scheme(reader, module),
                "type": layer_type(module),
                "params": w.numel(),
                "signal": signal,
                "noise": noise,
                "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf,
                "rel_error": math.sqrt(noise / signal) if signal > 0 else 0.0,
            }
        )
    return rows


def _summaries(rows: list[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    out = {}
    for name, group in sorted(groups.items()):
        signal, noise = sum(r["signal"] for r in group), sum(r["noise"] for r in group)
        finite = [r["sqnr_db"] for r in group if math.isfinite(r["sqnr_db"])]
        out[name] = {
            "modules": len(group),
            "params": sum(r["params"] for r in group),
            "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else math.inf,
            "min_sqnr_db": min(finite) if finite else math.inf,
            "rel_error": math.sqrt(noise / signal) if signal > 0 else 0.0,
        }
    return out


def _check_inputs(reference_dir: Path, quantized_dir: Path) -> None:
    """Fail before any work (and before anything is written) on a missing or unreadable checkpoint.

    Raises:
        CheckpointError: naming the directory, config.json or shard at fault.
    """
    from nvfp4_ext.checkpoint.config import find_quant_config
    from nvfp4_ext.quantize.io import list_source_tensors

    for root in (reference_dir, quantized_dir):
        find_quant_config(root)  # missing directory, config.json that is not a JSON object
        list_source_tensors(root)  # no shards, bad headers, truncated shards


def provenance(quantized_dir: Path) -> dict:
    """How the quantized checkpoint was made: recipe and scale rule from `nvfp4-ext quantize`'s record,
    else the quantization config's algorithm (checkpoints from other producers)."""
    from nvfp4_ext.checkpoint.config import find_quant_config
    from nvfp4_ext.quantize.quantizer import PROVENANCE_FILE

    try:
        info = json.loads((quantized_dir / PROVENANCE_FILE).read_text())
        return {"recipe": str(info["recipe"]), "scales": str(info["scales"])}
    except (OSError, ValueError, KeyError, TypeError):
        config = find_quant_config(quantized_dir)
        algo = config.quant_algo if config is not None else "unknown"
        return {"recipe": f"{algo} (not made by nvfp4-ext)", "scales": "unknown"}


def model_name(model_dir: Path) -> str:
    """A readable name: config.json's `_name_or_path` (as Hugging Face saved it), else the directory."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        name = config.get("_name_or_path") if isinstance(config, dict) else None
    except (OSError, ValueError):
        name = None
    return str(name) if name else model_dir.absolute().name


def evaluate(
    reference_dir: str | Path, quantized_dir: str | Path, *, text: str | None = None, model: bool = True
) -> dict:
    """Weight and (optionally) model metrics as one JSON-able report.

    Raises:
        CheckpointError: a missing or unreadable checkpoint (checked before any metric is computed).
    """
    reference_dir, quantized_dir = Path(reference_dir), Path(quantized_dir)
    _check_inputs(reference_dir, quantized_dir)
    rows = weight_metrics(reference_dir, quantized_dir)
    report = {
        "reference": str(reference_dir),
        "quantized": str(quantized_dir),
        "model_name": model_name(reference_dir),
        **provenance(quantized_dir),
        "by_precision": _summaries(rows, "scheme"),
        "by_layer_type": _summaries(rows, "type"),
        "layers": rows,
    }
    if model:
        from nvfp4_ext.quantize.model_eval import model_metrics

        report["model"] = model_metrics(reference_dir, quantized_dir, text=text)
    return report


def _markdown(report: dict) -> str:
    lines = [f"# NVFP4 evaluation\n\nreference `{report['reference']}`, quantized `{report['quantized']}`\n"]
    for title, key in (("By precision", "by_precision"), ("By layer type", "by_layer_type")):
        lines += [
            f"## {title}\n",
            "| group | modules | params | SQNR (dB) | min SQNR (dB) | rel. error |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in report[key].items():
            lines.append(
                f"| {name} | {s['modules']} | {s['params']} | {s['sqnr_db']:.2f} | {s['min_sqnr_db']:.2f} | "
                f"{s['rel_error']:.4f} |"
            )
        lines.append("")
    model = report.get("model")
    if model is not None:
        lines.append("## Model\n")
        if "skipped" in model:
            lines.append(f"skipped: {model['skipped']}\n")
        else:
            lines.append(f"{model['mode']}; {model['tokens']} positions; text: {model['text']}\n")
            lines.append(f"- KL(reference ‖ quantized), mean per position: {model['kl_mean']:.5f}")
            lines.append(f"- top-1 agreement: {100 * model['top1_agreement']:.2f}%")
            if model.get("perplexity_reference") is not None:
                lines.append(
                    f"- perplexity: reference {model['perplexity_reference']:.3f}, "
                    f"quantized {model['perplexity_quantized']:.3f}"
                )
            lines.append("")
    lines += ["## Layers\n", "| module | scheme | SQNR (dB) | rel. error |", "|---|---|---:|---:|"]
    lines += [
        f"| {r['module']} | {r['scheme']} | {r['sqnr_db']:.2f} | {r['rel_error']:.4f} |"
        for r in report["layers"]
    ]
    return "\n".join(lines) + "\n"


_MAX_LABELS = 80  # more layers than this: label every n-th bar so the names stay legible


def _short_names(modules: list[str]) -> list[str]:
    """Module names without the prefix they all share (`model.layers.`), which only costs width."""
    parts = [m.split(".") for m in modules]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def sqnr_figure(report: dict):
    """A matplotlib Figure: a bar per layer (checkpoint order, named on the x axis) coloured by scheme, y from
    0 dB so that a few tenths of a dB look as small as they are, a dashed line at each scheme's overall SQNR,
    and a title naming the model, recipe and scale rule.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = report["layers"]
    colours = {"nvfp4": "tab:blue", "nvfp4_w4a16": "tab:cyan", "fp8": "tab:orange", "fp8_block": "tab:red"}
    finite = [r["sqnr_db"] for r in rows if math.isfinite(r["sqnr_db"])]
    top = max(10.0, 1.15 * max(finite, default=10.0))
    fig = Figure(figsize=(min(40.0, max(8.0, 0.22 * len(rows) + 2)), 6))
    ax = fig.add_subplot()
    xs = range(len(rows))
    heights = [min(r["sqnr_db"], top) for r in rows]
    ax.bar(xs, heights, width=0.8, color=[colours.get(r["scheme"], "tab:gray") for r in rows])
    legend = []
    for scheme, summary in report["by_precision"].items():
        colour = colours.get(scheme, "tab:gray")
        ax.axhline(min(summary["sqnr_db"], top), color=colour, linestyle="--", linewidth=1)
        label = f"{scheme}: {summary['modules']} layers, {summary['sqnr_db']:.2f} dB overall (dashed)"
        legend.append(Patch(color=colour, label=label))
    step = max(1, -(-len(rows) // _MAX_LABELS))
    names = _short_names([r["module"] for r in rows])
    ax.set_xticks(list(xs)[::step], names[::step], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, top)
    ax.set_xlabel("layer (checkpoint order)" + (f", every {step}th named" if step > 1 else ""))
    ax.set_ylabel("weight SQNR (dB, higher is better)")
    ax.set_title(
        f"per-layer weight SQNR of {report.get('model_name', report['reference'])}\n"
        f"recipe {report.get('recipe', 'unknown')}, scale rule {report.get('scales', 'unknown')}"
    )
    ax.legend(handles=legend, loc="upper right", fontsize=8, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _plot(report: dict, path: Path) -> bool:
    try:
        figure = sqnr_figure(report)
    except ImportError:  # matplotlib is optional
        return False
    figure.savefig(path, dpi=110)
    return True


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write report.md, report.json and (if matplotlib is installed) sqnr.png; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.md", out_dir / "report.json"]
    paths[0].write_text(_markdown(report))
    paths[1].write_text(json.dumps(report, indent=1, default=str) + "\n")
    if _plot(report, out_dir / "sqnr.png"):
        paths.append(out_dir / "sqnr.png")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", metavar="REFERENCE_DIR", help="the unquantized checkpoint")
    parser.add_argument(
        "quantized", metavar="QUANTIZED_DIR", help="its quantized version (ModelOpt or compressed-tensors)"
    )
    parser.add_argument(
        "--text", metavar="FILE", help="text for KL/top-1/perplexity (default: a text shipped with nvfp4_ext)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write report.md, report.json and sqnr.png here (default: print the summary, write nothing)",
    )
    parser.add_argument("--weights-only", action="store_true", help="skip running the models")


def run(args: argparse.Namespace) -> int:
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--text: cannot read {args.text}: {exc}") from None
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr say nothing here
    except ImportError:
        pass  # model metrics will say transformers is missing
    report = evaluate(args.reference, args.quantized, text=text, model=not args.weights_only)
    print(f"{report['model_name']}, recipe {report['recipe']}, scale rule {report['scales']}")
    for name, s in report["by_precision"].items():
        print(
            f"{name:12s} {s['modules']:5d} modules  SQNR {s['sqnr_db']:6.2f} dB  "
            f"rel. error {s['rel_error']:.4f}"
        )
    model = report.get("model") or {}
    if "kl_mean" in model:
        print(f"model: KL {model['kl_mean']:.5f}, top-1 agreement {100 * model['top1_agreement']:.2f}%")
    elif "skipped" in model:
        print(f"model metrics skipped: {model['skipped']}")
    if out is None:
        print("(pass --out DIR to write report.md, report.json and sqnr.png)")
    else:
        paths = write_report(report, out)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
