"""The kernel benchmarks run on a CPU machine: they say there is no GPU and pass their interpreter smoke."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["bench_gemm.py", "bench_moe.py"])
def test_benchmark_cpu_smoke(script):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmark times real kernels; run it by hand")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no CUDA GPU here" in result.stdout
    assert "nvfp4-triton" in result.stdout  # the kernel itself ran, checked against the reference
    assert result.stdout.rstrip().splitlines()[-1].startswith("smoke: ok")
