"""Triton denoise-stats kernels: interpreter cases against the torch path, AOT compile with zero spills.

The interpreter cases need TRITON_INTERPRET=1 before Triton decorates the kernels (and it would turn every
other kernel in the process into the interpreter), so `test_interpreter_cases` reruns this file's `interp`
cases in a subprocess with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")


@pytest.mark.skipif(INTERPRETED, reason="the cases run in this process directly")
def test_interpreter_cases() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(Path(__file__)),
        "-k",
        "interp_",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2]


@interp_only
@pytest.mark.parametrize(
    ("rows", "hidden", "vocab", "dtype"),
    [
        (5, 32, 1000, torch.float32),
        (20, 48, 333, torch.float32),
        (16, 64, 250, torch.float16),
        (3, 16, 64, torch.float32),
    ],
    ids=["v1000", "odd-shapes", "fp16", "one-tile"],
)
def test_interp_kernel_matches_torch(rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> None:
    from nvfp4_ext.diffusion.stats import fused_denoise_stats

    gen = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype)
    temps = torch.rand(rows, generator=gen) + 0.4
    kwargs = dict(seed=7, row_ids=torch.arange(100, 100 + rows), cap=30.0, embed_scale=hidden**0.5)
    ref = fused_denoise_stats(h.float(), weight.float(), temps, backend="torch", **kwargs)
    out = fused_denoise_stats(h, weight, temps, backend="triton", **kwargs)
    assert torch.equal(out.argmax, ref.argmax)
    assert torch.equal(out.sample, ref.sample)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.top_prob, ref.top_prob, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.soft_embedding, ref.soft_embedding, rtol=1e-4, atol=1e-4)


@interp_only
def test_interp_without_cap_or_soft_embedding_and_zero_rows() -> None:
    from nvfp4_ext.diffusion.stats import fused_denoise_stats

    gen = torch.Generator().manual_seed(1)
    h, weight = torch.randn(4, 16, generator=gen), torch.randn(100, 16, generator=gen)
    ref = fused_denoise_stats(h, weight, 0.5, seed=2, cap=None, backend="torch")
    out = fused_denoise_stats(h, weight, 0.5, seed=2, cap=None, backend="triton")
    assert out.soft_embedding is None
    assert torch.equal(out.argmax, ref.argmax) and torch.equal(out.sample, ref.sample)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-4, atol=1e-5)
    empty = fused_denoise_stats(h[:0], weight, 0.5, seed=2, embed_scale=4.0, backend="triton")
    assert empty.argmax.shape == (0,) and empty.soft_embedding.shape == (0, 16)


@pytest.mark.skipif(INTERPRETED, reason="AOT compilation needs real (non-interpreted) kernels")
@pytest.mark.parametrize("capability", [80, 90])
def test_aot_compiles_without_spills(
    tmp_path: Path, capability: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvfp4_ext.kernels.denoise_stats import kernel_variants
    from nvfp4_ext.kernels.report import compile_variant

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    for variant in kernel_variants("bf16"):
        result = compile_variant(variant, capability, tmp_path)
        assert 0 < result.registers <= 255 and result.spills == 0 and result.stack_bytes == 0, result
        assert result.ctas_per_sm >= 1, result


def test_launcher_rejects_bad_inputs() -> None:
    from nvfp4_ext.kernels.denoise_stats import denoise_stats_triton

    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        denoise_stats_triton(
            torch.zeros(2, 8),
            torch.zeros(4, 8, dtype=torch.float16),
            torch.ones(2),
            seed=0,
            row_ids=torch.arange(2),
            cap=30.0,
            embed_scale=None,
        )
    with pytest.raises(ValueError, match="contiguous"):
        denoise_stats_triton(
            torch.zeros(8, 2).T,
            torch.zeros(4, 8),
            torch.ones(2),
            seed=0,
            row_ids=torch.arange(2),
            cap=30.0,
            embed_scale=None,
        )
