"""Fused (vocab-chunked) denoise statistics == the naive [rows, vocab] computation."""

from __future__ import annotations

import pytest
import torch

from nvfp4_ext.diffusion.stats import (
    categorical_entropy,
    denoise_stats_ref,
    fused_denoise_stats,
    gumbel_noise,
    logits_denoise_stats,
    softcap,
)


def _inputs(rows: int, hidden: int, vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.4).to(dtype)
    temps = torch.rand(rows, generator=gen) * 0.4 + 0.4
    return h, weight, temps


@pytest.mark.parametrize(
    ("rows", "vocab", "chunk"),
    [(5, 1000, 128), (16, 777, 100), (3, 257, 4096), (9, 300, 1), (0, 64, 16)],
    ids=["v1000-c128", "v777-c100", "chunk>vocab", "chunk1", "zero-rows"],
)
def test_fused_equals_naive(rows: int, vocab: int, chunk: int) -> None:
    hidden = 32
    h, weight, temps = _inputs(rows, hidden, vocab)
    noise = gumbel_noise(11, torch.arange(rows), torch.arange(vocab))
    ref = denoise_stats_ref(
        softcap(h @ weight.T, 30.0), temps, noise=noise, embed_weight=weight, embed_scale=hidden**0.5
    )
    out = fused_denoise_stats(h, weight, temps, seed=11, cap=30.0, embed_scale=hidden**0.5, chunk_size=chunk)
    assert torch.equal(out.argmax, ref.argmax)
    assert torch.equal(out.sample, ref.sample)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.top_prob, ref.top_prob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.soft_embedding, ref.soft_embedding, rtol=1e-5, atol=1e-5)


def test_fused_handles_peaked_rows_and_scalar_temperature() -> None:
    h, weight, _ = _inputs(4, 16, 500, seed=2)
    h[0] = weight[450] * 6  # a near one-hot row whose max sits in a late chunk: exercises the rescaling
    ref = denoise_stats_ref(
        softcap(h @ weight.T, 30.0), 0.4, noise=gumbel_noise(3, torch.arange(4), torch.arange(500))
    )
    out = fused_denoise_stats(h, weight, 0.4, seed=3, chunk_size=64)
    assert out.soft_embedding is None
    assert torch.equal(out.argmax, ref.argmax) and torch.equal(out.sample, ref.sample)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-4, atol=1e-5)
    assert int(out.argmax[0]) == 450 and float(out.top_prob[0]) > 0.9


def test_row_ids_select_the_noise() -> None:
    h, weight, temps = _inputs(6, 16, 300, seed=5)
    full = fused_denoise_stats(h, weight, temps, seed=9, chunk_size=50)
    tail = fused_denoise_stats(h[3:], weight, temps[3:], seed=9, row_ids=torch.arange(3, 6), chunk_size=70)
    assert torch.equal(full.sample[3:], tail.sample)


def test_gumbel_noise_is_standard_gumbel_and_seeded() -> None:
    noise = gumbel_noise(1, torch.arange(64), torch.arange(4096))
    assert abs(float(noise.mean()) - 0.5772) < 0.01
    assert abs(float(noise.std()) - 1.2825) < 0.01
    assert torch.equal(noise[5:9, 100:200], gumbel_noise(1, torch.arange(5, 9), torch.arange(100, 200)))
    assert not torch.equal(noise, gumbel_noise(2, torch.arange(64), torch.arange(4096)))


def test_gumbel_max_samples_follow_the_softmax() -> None:
    vocab, trials = 6, 20000
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    noise = gumbel_noise(123, torch.arange(trials), torch.arange(vocab))
    counts = torch.bincount((z + noise).argmax(-1), minlength=vocab).float() / trials
    torch.testing.assert_close(counts, z.softmax(-1), atol=0.015, rtol=0)


def test_categorical_entropy_is_bitwise_torch_distributions() -> None:
    z = torch.randn(4, 8, 100) * 7
    z[0, 0, :50] = -torch.inf
    assert torch.equal(categorical_entropy(z), torch.distributions.Categorical(logits=z).entropy())


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="expected hidden"):
        fused_denoise_stats(torch.zeros(2, 8), torch.zeros(10, 4), 1.0, seed=0)
    with pytest.raises(ValueError, match="backend"):
        fused_denoise_stats(torch.zeros(2, 8), torch.zeros(10, 8), 1.0, seed=0, backend="cuda")


@pytest.mark.parametrize("chunk", [64, 333, 5000])
def test_logits_stats_equal_naive_with_masked_columns(chunk: int) -> None:
    h, weight, temps = _inputs(12, 16, 1000, seed=7)
    logits = softcap(h @ weight.T, 30.0)
    logits[0, 100:] = -torch.inf  # top-k style masking, the whole tail of the row
    logits[1, :900] = -torch.inf  # masked head: the first chunks of this row see only -inf
    noise = gumbel_noise(4, torch.arange(12), torch.arange(1000))
    ref = denoise_stats_ref(logits, temps, noise=noise, embed_weight=weight, embed_scale=4.0)
    out = logits_denoise_stats(logits, temps, seed=4, embed_weight=weight, embed_scale=4.0, chunk_size=chunk)
    assert torch.equal(out.argmax, ref.argmax) and torch.equal(out.sample, ref.sample)
    assert int(out.sample[0]) < 100 and int(out.sample[1]) >= 900
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.top_prob, ref.top_prob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.soft_embedding, ref.soft_embedding, rtol=1e-5, atol=1e-5)
    assert logits_denoise_stats(logits, temps, seed=4, chunk_size=chunk).soft_embedding is None
