"""Smoke runs of the DiffusionGemma benchmarks at tiny sizes so the scripts keep working (no timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_memory_accounting_sees_the_vocab_sized_temporaries(tmp_path: Path) -> None:
    import bench_denoise_memory as bench

    rows, vocab = 32, 8192
    naive = bench.measure_tensor_bytes("naive", rows, 16, vocab, chunk=512)
    fused = bench.measure_tensor_bytes("fused", rows, 16, vocab, chunk=512)
    assert naive >= 3 * rows * vocab * 4  # logits, log-probs and probs are alive together
    assert fused <= 12 * rows * 512 * 8  # a handful of [rows, chunk] blocks (the noise hash is int64)
    out = tmp_path / "mem.json"
    assert (
        bench.main(
            [
                "--vocab",
                "4096",
                "--canvas",
                "16",
                "--hidden",
                "16",
                "--chunk",
                "256",
                "--requests",
                "1",
                "--no-rss",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows_out = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows_out] == ["naive", "fused"]
    assert rows_out[1]["tensor_peak_bytes_per_request"] < rows_out[0]["tensor_peak_bytes_per_request"] / 4


@pytest.mark.parametrize("skip_nvfp4", [True])
def test_train_then_bench_policies_smoke(tmp_path: Path, skip_nvfp4: bool) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    import bench_policies
    import train_tiny_diffusion_gemma as train

    model_dir = tmp_path / "dg_sort"
    assert train.main(["--out", str(model_dir), "--steps", "2", "--batch", "4", "--digits", "4"]) == 0
    meta = json.loads((model_dir / "task.json").read_text())
    assert meta["steps_run"] == 2 and 1e6 < meta["parameters"] < 5e6
    again = tmp_path / "dg_sort_again"  # deterministic from the seed
    assert train.main(["--out", str(again), "--steps", "2", "--batch", "4", "--digits", "4"]) == 0
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    out = tmp_path / "policies.json"
    argv = ["--model", str(model_dir), "--examples", "4", "--max-steps", "2", "--out", str(out)]
    assert bench_policies.main(argv + (["--skip-nvfp4"] if skip_nvfp4 else [])) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["policy"] for r in rows} == {"entropy_bound", "confidence", "fixed_k"}
    assert all(0 <= r["exact_match"] <= 1 and 0 < r["steps_per_token"] <= 2 / 4 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0
