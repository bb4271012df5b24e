"""`nvfp4-ext` command line: one subcommand per module, imported only when it runs.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Errors of ours
(`Nvfp4ExtError`) become one `error: ...` line on stderr and exit status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nvfp4_ext.errors import Nvfp4ExtError

# name -> (module, one-line help). Modules are imported lazily so `--help` works on any machine.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("nvfp4_ext.checkpoint.inspect", "print a checkpoint's per-layer precision table"),
    "quantize": ("nvfp4_ext.quantize.cli", "quantize a BF16/FP16/FP32 checkpoint to NVFP4"),
    "eval": ("nvfp4_ext.quantize.evaluate", "report NVFP4-vs-reference accuracy of a checkpoint pair"),
    "generate": ("nvfp4_ext.diffusion.cli", "run DiffusionGemma denoising generation on CPU (no engine)"),
    "kernels-report": ("nvfp4_ext.kernels.report", "compile the Triton kernels ahead of time and report"),
    "demo": ("nvfp4_ext.demo", "build a tiny model, quantize it and serve it through vLLM"),
    "gpu-check": ("nvfp4_ext.gpu_check", "check kernels, graphs, benchmarks and serving on a GPU"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvfp4-ext", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module_name, help_text = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"nvfp4-ext {args.command}", description=help_text)
    sub.add_argument("--debug", action="store_true", default=args.debug, help="show tracebacks for errors")
    module.add_arguments(sub)
    sub_args = sub.parse_args(rest)
    try:
        return int(module.run(sub_args) or 0)
    except Nvfp4ExtError as exc:
        if sub_args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
