"""Runs the Triton interpreter cases (`test_kernels_interpreter_cases.py`) in a TRITON_INTERPRET=1 subprocess.

The variable has to be set before Triton decorates any kernel, and in this process it would also turn the
AOT-compile tests' and the engines' kernels into interpreted ones, so the cases get their own interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("test_kernels_interpreter_cases.py")


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the cases run in this process directly"
)
def test_triton_kernels_match_references_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(CASES)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, check=False)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"interpreter cases failed:\n{report}"
    passed = re.search(r"(\d+) passed", result.stdout)
    # Every case must have run: a silent skip of the whole module would otherwise look like success.
    assert passed and int(passed.group(1)) >= 19, report
    assert "skipped" not in result.stdout.splitlines()[-1], report
