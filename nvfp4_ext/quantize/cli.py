"""`nvfp4-ext quantize SRC DST`: quantize a BF16/FP16/FP32 Hugging Face checkpoint to NVFP4."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from nvfp4_ext.quantize.options import OUTPUT_FORMATS, RECIPES, SCALE_METHODS

__all__ = ["add_arguments", "run", "summarize"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="input model directory (safetensors, BF16/FP16/FP32)")
    parser.add_argument(
        "dst", metavar="DST", help="output directory (created; must not exist unless --force)"
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="w4a16",
        help="w4a16: weight-only NVFP4, no calibration (default); nvfp4: W4A4, needs --calib for the "
        "activation scales; mixed: routed experts NVFP4, attention and MLP FP8, the rest unchanged "
        "(static FP8/W4A4 scales with --calib, else block FP8 and W4A16)",
    )
    parser.add_argument(
        "--scales",
        choices=SCALE_METHODS,
        default="rtn",
        help="block-scale rule: rtn (ModelOpt), four-over-six (max 4 or 6 per block, lower error wins), "
        "mse (sweep e4m3 scale candidates per block) (default: rtn)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="fnmatch pattern of module names to keep unquantized (repeatable), on top of the defaults "
        "(embeddings, lm_head, norms, routers, vision tower, self-conditioning)",
    )
    parser.add_argument(
        "--calib", metavar="FILE", help="text file to calibrate activation scales on (runs the model on CPU)"
    )
    parser.add_argument(
        "--format",
        dest="output_format",
        choices=OUTPUT_FORMATS,
        default="modelopt",
        help="checkpoint layout (default: modelopt)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def summarize(out_dir: Path) -> str:
    """One-paragraph summary of a finished run from its provenance file."""
    from nvfp4_ext.quantize.quantizer import PROVENANCE_FILE

    info = json.loads((out_dir / PROVENANCE_FILE).read_text())
    layers = info["layers"]
    sse = sum(layer["sse"] for layer in layers)
    sse_rtn = sum(layer["sse_rtn"] for layer in layers)
    signal = sum(layer["signal"] for layer in layers)
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    lines = [
        f"wrote {out_dir} ({size / 1e6:.1f} MB, {len(layers)} quantized tensors, recipe {info['recipe']})"
    ]
    if signal > 0 and sse > 0:
        lines.append(f"weight SQNR {10 * math.log10(signal / sse):.2f} dB over quantized layers")
    if info["scales"] != "rtn" and sse_rtn > 0:
        gain = 100 * (1 - sse / sse_rtn)
        lines.append(f"{info['scales']} scales: squared error {gain:.1f}% lower than rtn")
    kept = info.get("kept", {})
    if kept:  # each one was logged (with its reason) as it was planned: count them, do not repeat them
        lines.append(
            f"kept {len(kept)} weight-like tensor{'s' if len(kept) > 1 else ''} in source precision "
            f"(reasons above and in {PROVENANCE_FILE})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from nvfp4_ext.quantize.quantizer import quantize_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = quantize_checkpoint(
        args.src,
        args.dst,
        recipe=args.recipe,
        scales=args.scales,
        exclude=tuple(args.exclude),
        calib=args.calib,
        output_format=args.output_format,
        force=args.force,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(summarize(Path(out)))
    return 0
