"""Make, check and serve NVFP4 checkpoints with vLLM and SGLang (`nvfp4-ext COMMAND --help` for details).

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int` and imports nothing heavy
(torch, transformers, Triton) at module level, so `--help` and usage errors answer at once; the heavy
imports happen inside `run`. Errors of ours (`Nvfp4ExtError`) and usage errors become one `error: ...` line
on stderr and exit status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from nvfp4_ext import __version__
from nvfp4_ext.errors import Nvfp4ExtError

# name -> (module, one-line help). Modules are imported only for the command that runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("nvfp4_ext.checkpoint.inspect", "print a checkpoint's per-layer precision table"),
    "quantize": ("nvfp4_ext.quantize.cli", "quantize a BF16/FP16/FP32 checkpoint to NVFP4"),
    "eval": ("nvfp4_ext.quantize.evaluate", "report NVFP4-vs-reference accuracy of a checkpoint pair"),
    "generate": ("nvfp4_ext.diffusion.cli", "run DiffusionGemma denoising generation on CPU (no engine)"),
    "kernels-report": ("nvfp4_ext.kernels_report_cli", "compile the Triton kernels ahead of time and report"),
    "demo": ("nvfp4_ext.demo", "build a tiny model, quantize it and serve it through vLLM"),
    "gpu-check": ("nvfp4_ext.gpu_check", "check kernels, graphs, benchmarks and serving on a GPU"),
}

DESCRIPTION = (
    "Quantize Hugging Face checkpoints to NVFP4, check them (inspect, eval) and serve them with vLLM or "
    "SGLang (--quantization nvfp4_ext); `demo` runs the whole path on a tiny model."
)


class _Parser(argparse.ArgumentParser):
    """argparse with README's error form: one `error: ...` line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nvfp4-ext",
        description=DESCRIPTION,
        epilog="Run `nvfp4-ext COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"nvfp4-ext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _parse(argv: list[str]) -> tuple[object, argparse.Namespace] | None:
    """(command module, its arguments), or None when no command was given; SystemExit on usage errors."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return None
    module_name, help_text = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    sub = _Parser(prog=f"nvfp4-ext {args.command}", description=help_text)
    sub.add_argument("--debug", action="store_true", default=args.debug, help="show tracebacks for errors")
    module.add_arguments(sub)
    return module, sub.parse_args(rest)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = _parse(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if parsed is None:
        build_parser().print_help()
        return 0
    module, sub_args = parsed
    try:
        return int(module.run(sub_args) or 0)  # type: ignore[attr-defined]
    except Nvfp4ExtError as exc:
        if sub_args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
