"""`nvfp4-ext kernels-report`: compile every shipped kernel configuration ahead of time, no GPU needed.

Each distinct (kernel, config) of the shipped tables is compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cap, 32))`; Triton's bundled `ptxas-blackwell -v` then reports registers, spills
and stack of the PTX, and Triton's metadata gives the dynamic shared memory. The occupancy estimate uses
the per-SM limits below (registers, warps, shared memory, CTAs), as the CUDA occupancy calculator does.
"K-loop SASS / weight" is the main loop's instruction count (nvdisasm) per decoded weight element and lane:
about 5 is what an H100 can issue while streaming NVFP4 weights at full bandwidth (see `sass.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

# the `nvfp4-ext kernels-report` flags live in a module without torch (instant --help); re-exported here
from nvfp4_ext.kernels_report_cli import add_arguments

from .sass import loop_instruction_mix
from .variants import KernelVariant, shipped_variants

__all__ = [
    "ALL_CAPABILITIES",
    "ARCHES",
    "Arch",
    "CompileResult",
    "KernelVariant",
    "compile_variant",
    "is_decode_variant",
    "occupancy",
    "run",
    "shipped_variants",
]

@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one target (CUDA occupancy calculator data; all have 64K 32-bit registers)."""

    ptxas: str
    smem_bytes: int  # shared memory per SM usable by CTAs
    max_warps: int
    max_ctas: int


# sm_80 A100, sm_89 Ada (L40S, RTX 6000 Ada), sm_90a H100/H200, sm_100a B200, sm_120 RTX 5090 / RTX PRO 6000.
ARCHES: dict[int, Arch] = {
    80: Arch("sm_80", 164 * 1024, 64, 32),
    89: Arch("sm_89", 100 * 1024, 48, 24),
    90: Arch("sm_90a", 228 * 1024, 64, 32),
    100: Arch("sm_100a", 228 * 1024, 64, 32),
    120: Arch("sm_120a", 100 * 1024, 48, 32),
}
ALL_CAPABILITIES = tuple(ARCHES)
_REGISTERS_PER_SM = 65536
_SMEM_RESERVED_PER_CTA = 1024


@dataclass(frozen=True)
class CompileResult:
    """Resources of one variant on one architecture."""

    kernel: str
    config: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    smem_bytes: int
    ctas_per_sm: int
    occupancy: float
    loop_sass_per_weight: float | None
    used_by: tuple[str, ...]

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def occupancy(registers: int, smem_bytes: int, num_warps: int, capability: int) -> tuple[int, float]:
    """(resident CTAs per SM, fraction of the SM's warp slots used) for one kernel configuration."""
    arch = ARCHES[capability]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    warps_by_registers = _REGISTERS_PER_SM // regs_per_warp
    ctas = min(
        warps_by_registers // num_warps,
        arch.max_warps // num_warps,
        arch.smem_bytes // (smem_bytes + _SMEM_RESERVED_PER_CTA),
        arch.max_ctas,
    )
    return ctas, ctas * num_warps / arch.max_warps


# ----------------------------------------------------------------------------------------------- compile
def _ptxas() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not path.exists():
        raise RuntimeError(f"Triton's bundled ptxas-blackwell is missing at {path}; reinstall triton>=3.4")
    return path


def _divisibility_attrs(variant: KernelVariant) -> dict[tuple[int, ...], list[list[Any]]]:
    """Pointers and i32 sizes/strides are multiples of 16 for every shipped shape: tell the compiler so,
    as the runtime specialization would, so the PTX matches what a real launch compiles."""
    names = [n for n, t in variant.signature.items() if t.startswith("*") or t == "i32"]
    names = [n for n in names if n not in ("M", "num_pairs", "top_k")]
    return {(variant.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def compile_variant(variant: KernelVariant, capability: int, workdir: Path) -> CompileResult:
    """Compile one variant for sm_`capability` and read its resources from ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .ops import marlin_decode_mode_for

    arch = ARCHES[capability].ptxas
    constexprs = dict(variant.constexprs)
    if constexprs.get("MARLIN_DECODE"):  # the PTX decode's flavour follows the target, as at launch
        constexprs["MARLIN_DECODE"] = marlin_decode_mode_for(capability)
    source = ASTSource(
        fn=variant.fn,
        signature=variant.signature,
        constexprs=constexprs,
        attrs=_divisibility_attrs(variant),
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages, "enable_fp_fusion": True},
    )
    ptx_path = workdir / f"{variant.fn.__name__}_{capability}.ptx"
    ptx_path.write_text(compiled.asm["ptx"])
    result = subprocess.run(
        [str(_ptxas()), "-v", "--gpu-name", arch, str(ptx_path), "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(
            f"ptxas failed on {variant.kernel} [{variant.config}] {arch}: {result.stderr.strip()}"
        )
    log = result.stderr + result.stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        if not found:
            raise RuntimeError(
                f"ptxas output lacks {pattern!r} for {variant.kernel} [{variant.config}] {arch}"
            )
        return int(found.group(1))

    registers = number(r"Used (\d+) registers")
    smem = int(compiled.metadata.shared)
    ctas, occ = occupancy(registers, smem, variant.num_warps, capability)
    loop_instructions, _ = loop_instruction_mix(compiled.asm["cubin"])
    # Each warp runs the loop body once per K step; lanes x warps x instructions over the decoded tile.
    per_weight = (
        loop_instructions * 32 * variant.num_warps / variant.weight_tile if variant.weight_tile else None
    )
    return CompileResult(
        kernel=variant.kernel,
        config=variant.config,
        arch=arch,
        registers=registers,
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
        smem_bytes=smem,
        ctas_per_sm=ctas,
        occupancy=occ,
        loop_sass_per_weight=per_weight,
        used_by=variant.used_by,
    )


def compile_all(
    capabilities: tuple[int, ...] = ALL_CAPABILITIES,
    kernel_filter: str = "",
    select: Callable[[KernelVariant], bool] | None = None,
) -> list[CompileResult]:
    """Compile every shipped variant (those `select` accepts) for each capability, one ptxas at a time;
    Triton's cache goes to a temporary directory."""
    results = []
    with tempfile.TemporaryDirectory(prefix="nvfp4_ext_aot_") as tmp:
        previous = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        try:
            for variant in shipped_variants():
                if kernel_filter and kernel_filter not in variant.kernel:
                    continue
                if select is not None and not select(variant):
                    continue
                for capability in capabilities:
                    results.append(compile_variant(variant, capability, Path(tmp)))
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous
    return results


def is_decode_variant(variant: KernelVariant) -> bool:
    """Whether the variant serves decode batches (a shipped row with M <= 16 launches it)."""
    return any(int(use.rsplit("M=", 1)[1]) <= 16 for use in variant.used_by)


def format_table(results: list[CompileResult]) -> str:
    """A markdown table of the results, one row per (kernel, config, arch)."""
    lines = [
        (
            "| kernel | config | arch | registers | spill st/ld (B) | smem (KiB) | CTAs/SM | occupancy "
            "| K-loop SASS / weight |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per_weight = f"{r.loop_sass_per_weight:.1f}" if r.loop_sass_per_weight else "-"
        lines.append(
            f"| {r.kernel} | {r.config} | {r.arch} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
            f"{r.smem_bytes / 1024:.0f} | {r.ctas_per_sm} | {r.occupancy:.0%} | {per_weight} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI
def predict(results: list[CompileResult], batch_sizes: tuple[int, ...] = (1, 16, 256)) -> str:
    """The `--predict` table from compiled default-decode (Marlin) results of the GPUs' targets."""
    from . import roofline

    capability_of = {arch.ptxas: cap for cap, arch in ARCHES.items()}
    resources = {}
    for r in results:
        if "portable" in r.config or r.loop_sass_per_weight is None:
            continue
        res = roofline.resources_from_label(r.config, r.loop_sass_per_weight, r.ctas_per_sm)
        for use in r.used_by:
            resources[(r.kernel, use, capability_of[r.arch])] = res
    return roofline.format_predictions(roofline.predict_diffusiongemma(resources, batch_sizes=batch_sizes))


def _predict_selection(variant: KernelVariant) -> bool:
    return variant.kernel != "fp8_gemm" and "portable" not in variant.config


def run(args: argparse.Namespace) -> int:
    """Print the resource table; exit status 1 if any configuration spills registers."""
    from nvfp4_ext.errors import ConfigError

    from .ops import interpreter_enabled

    if interpreter_enabled():
        raise ConfigError("kernels-report compiles real GPU code: unset TRITON_INTERPRET")
    results = compile_all(tuple(args.arch), args.kernel)
    print(format_table(results))
    if args.predict:
        from .roofline import GPUS

        needed = tuple(sorted({gpu.capability for gpu in GPUS.values()}))
        covered = not args.kernel and set(needed) <= set(args.arch)
        print("\n" + predict(results if covered else compile_all(needed, select=_predict_selection)))
    if args.used_by:
        for r in results:
            if r.arch == ARCHES[args.arch[0]].ptxas:
                print(f"\n{r.kernel} [{r.config}]: " + ", ".join(r.used_by))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps([{**asdict(r), "used_by": list(r.used_by)} for r in results], indent=2)
        )
    spilled = [r for r in results if r.spills]
    for r in spilled:
        print(
            f"SPILL: {r.kernel} [{r.config}] on {r.arch}: {r.spill_stores} B stored, {r.spill_loads} B loaded"
        )
    return 1 if spilled else 0
