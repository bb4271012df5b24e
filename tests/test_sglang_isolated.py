"""Runs the SGLang CPU suite (tests/test_sglang_cpu_*.py) in its own Python process.

Importing SGLang patches transformers globally and redirects cache directories (sglang/__init__.py), and on
CPU it needs torchvision from a side directory that would break vLLM's imports (see
`nvfp4_ext.engines.sglang.cpu_support`); none of that may leak into the process running the other tests.
The child's pass count is checked too, so a suite that silently skipped everything fails here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parents[1]
SUITE = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_sglang_cpu_*.py"))
# 62 collected: plugin 35 (incl. the Gemma 4 gelu and routed-scaling cases), dllm 17, packed 6, capture 4;
# slack for machine-dependent skips
MIN_PASSED = 56


def rerun_hint(command: list[str]) -> str:
    """The child's command line as a shell command a person can paste (interpreter included)."""
    return "NVFP4_EXT_SGLANG_CHILD=1 HF_HUB_OFFLINE=1 " + shlex.join(
        [arg for arg in command if not arg.startswith("--junitxml=")]
    )


def test_rerun_hint_names_the_interpreter() -> None:
    hint = rerun_hint([sys.executable, "-m", "pytest", "-q", "--junitxml=/tmp/x.xml", "tests/a b.py"])
    assert hint.split()[2] == shlex.quote(sys.executable) and hint.endswith("-m pytest -q 'tests/a b.py'")


def test_sglang_cpu_suite_in_own_process(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    env = dict(os.environ, NVFP4_EXT_SGLANG_CHILD="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *SUITE]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"SGLang CPU suite failed (rerun: {rerun_hint(command)}):\n{output}"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    assert passed >= MIN_PASSED, f"only {passed} SGLang CPU tests passed ({counts}):\n{output}"
