"""Count the SASS instructions of a compiled kernel's main loop (Triton's bundled `nvdisasm`, no GPU).

On Ampere/Hopper the weight-only kernels decode every weight on CUDA cores, so at decode batch sizes the
instructions issued per weight element decide whether a kernel can keep up with DRAM: an SM issues four
warp instructions (128 lane operations) per clock, and streaming NVFP4 weights at an H100's 3.35 TB/s
brings ~25 weight elements per SM per clock, leaving ~5 lane instructions per element.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

__all__ = ["loop_instruction_mix"]

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\(\.(L_x_\d+)\)")


def loop_instruction_mix(cubin: bytes) -> tuple[int, Counter[str]]:
    """(instruction count, opcode histogram) of the largest backward-branch loop in the cubin's SASS."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        listing = subprocess.run(
            [str(nvdisasm), "-c", handle.name], capture_output=True, text=True, check=True
        )
    instructions: list[tuple[int, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in listing.stdout.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _INSTRUCTION.search(line)
        if found:
            address = int(found.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, found.group(2), line))
    best: list[str] = []
    for address, opcode, line in instructions:
        target = _BRANCH_TARGET.search(line)
        if opcode.startswith("BRA") and target and labels.get(target.group(1), address) < address:
            body = [op for a, op, _ in instructions if labels[target.group(1)] <= a <= address]
            best = max(best, body, key=len)
    return len(best), Counter(op.split(".")[0] for op in best)
