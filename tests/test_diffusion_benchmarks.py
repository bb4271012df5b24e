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


@pytest.mark.parametrize("task_name", ["add", "sort"])
def test_train_then_bench_policies_smoke(tmp_path: Path, task_name: str) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    import bench_policies
    import train_tiny_diffusion_gemma as train

    model_dir = tmp_path / "dg_sort"
    small = ["--task", task_name, "--steps", "2", "--batch", "4", "--digits", "4", "--eval-examples", "4"]
    assert train.main(["--out", str(model_dir), *small]) == 0
    meta = json.loads((model_dir / "task.json").read_text())
    assert meta["task"] == task_name and meta["steps_run"] == 2 and 1e6 < meta["parameters"] < 5e6
    # steps_run == 2 above shows the budget did not cut the run; wall time itself is not asserted
    assert meta["stopped_on_time"] is False and meta["budget_seconds"] == 600 and meta["total_seconds"] > 0
    assert 0 <= meta["eval_exact_match"] <= meta["eval_token_accuracy"] <= 1
    assert 0 < meta["eval_steps_per_token"] <= 16 / 4  # the checkpoint's default cap is 16 steps
    again = tmp_path / "dg_sort_again"  # deterministic from the seed
    assert train.main(["--out", str(again), *small]) == 0
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    out = tmp_path / "policies.json"
    argv = ["--model", str(model_dir), "--examples", "4", "--max-steps", "2", "--out", str(out)]
    assert bench_policies.main([*argv, "--skip-nvfp4"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["policy"] for r in rows} == {"entropy_bound", "confidence", "fixed_k"}
    answer_length = train.TASKS[task_name](num_digits=4).answer_length
    assert all(
        0 <= r["exact_match"] <= 1 and 0 < r["steps_per_token"] <= 2 / answer_length + 1e-6 for r in rows
    )
    assert out.with_suffix(".png").stat().st_size > 0


def test_training_stops_on_its_wall_time_budget(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import train_tiny_diffusion_gemma as train

    model_dir = tmp_path / "dg_sort"
    argv = ["--out", str(model_dir), "--steps", "50", "--batch", "2", "--digits", "4", "--eval-examples", "0"]
    assert train.main([*argv, "--max-minutes", "0.0001"]) == 0
    meta = json.loads((model_dir / "task.json").read_text())
    assert meta["stopped_on_time"] and meta["steps_run"] == 1
    assert "eval_exact_match" not in meta and (model_dir / "model.safetensors").stat().st_size > 0


def test_addition_task_answers_are_the_sums() -> None:
    import torch
    import train_tiny_diffusion_gemma as train

    task = train.AddTask(num_digits=3)
    prompts, answers = task.sample(16, torch.Generator().manual_seed(0))
    assert prompts.shape == (16, 9) and answers.shape == (16, task.answer_length) == (16, 4)
    assert (prompts[:, 4] == train.PLUS).all() and (prompts[:, -1] == train.SEP).all()

    def number(digit_tokens: torch.Tensor) -> int:
        return int("".join(str(int(t) - train.DIGIT0) for t in digit_tokens))

    for prompt, answer in zip(prompts, answers, strict=True):
        assert number(answer) == number(prompt[1:4]) + number(prompt[5:8])
    assert train.task_from_metadata({"task": "add", "num_digits": 3, "vocab_size": 32}) == task
