"""Flags of `nvfp4-ext kernels-report`, apart from `nvfp4_ext.kernels` (whose import loads torch and registers
the custom ops) so that `kernels-report --help` answers at once; the report itself is `kernels.report.run`."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["TARGET_CAPABILITIES", "add_arguments", "run"]

# compute capabilities the report compiles for; `kernels.report.ARCHES` maps each to its target (a test
# keeps the two equal)
TARGET_CAPABILITIES = (80, 89, 90, 100, 120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=list(TARGET_CAPABILITIES),
        choices=TARGET_CAPABILITIES,
        help="compute capabilities to compile for (default: all: 80 89 90 100 120)",
    )
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this text")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--used-by", action="store_true", help="list the shapes that launch each config")
    parser.add_argument(
        "--predict",
        action="store_true",
        help="also predict time and speedup over BF16 per DiffusionGemma shape on H100, H200, L40S and "
        "RTX 5090 from a static model (kernels/roofline.py; compiles their targets: 89 90 120)",
    )


def run(args: argparse.Namespace) -> int:
    from nvfp4_ext.kernels.report import run as report

    return report(args)
