"""Per-position statistics of a denoising step, naive and fused (memory-lean), in pure torch.

From the decoder's final hidden states h [R, H] and the tied embedding E [V, H], a step needs, for the
tempered distribution z = softcap(h E^T) / T of every row:
  argmax(z), a sample (Gumbel-max: argmax(z + g)), the entropy, the top probability, and the
  self-conditioning soft embedding softmax(z) E * sqrt(H).
`denoise_stats_ref` computes them from materialized [R, V] logits (the naive path and the oracle).
`fused_denoise_stats` walks the vocabulary in chunks with an online max / sum, so the largest temporary is
[R, chunk] instead of [R, V] (DiffusionGemma: V = 262144, 256 rows -> 268 MB per fp32 tensor).

The Gumbel noise is a counter-based hash of (seed, row, vocab index), so it does not depend on the chunking
and the Triton kernel (`nvfp4_ext.kernels.denoise_stats`) draws the same noise as this torch path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import torch

from nvfp4_ext.kernels.denoise_common import DenoiseStats, mix32, row_keys

__all__ = [
    "DEFAULT_CHUNK",
    "DenoiseStats",
    "categorical_entropy",
    "denoise_stats_ref",
    "fused_denoise_stats",
    "gumbel_noise",
    "logits_denoise_stats",
    "softcap",
]

DEFAULT_CHUNK = 1024
Backend = Literal["torch", "triton", "auto"]


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """HF's final-logit softcap in float32: `cap * tanh(x / cap)` (identity when cap is None)."""
    logits = logits.float()
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def gumbel_noise(seed: int | torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise g[r, c] = -log(-log(u)), u a hash of (seed, rows[r], cols[c]) in (0, 1).

    Args:
        seed: any int (only its low 32 bits matter) or a 0-dim int64 tensor.
        rows: [R] int64 global row ids; cols: [C] int64 vocabulary ids.
    Returns:
        [R, C] float32 noise, identical however the vocabulary is chunked.
    """
    return _noise_from_keys(row_keys(seed, rows), cols.to(device=rows.device, dtype=torch.int64))


def _noise_from_keys(keys: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    bits = mix32(keys[:, None] ^ cols[None, :])
    bits >>= 8
    u = bits.float()
    del bits
    u.add_(0.5).mul_(1.0 / (1 << 24))
    return u.log_().neg_().log_().neg_()


def categorical_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the last dim with exactly the ops of `torch.distributions.Categorical`
    (HF's acceptance and stopping use it, so the HF-exact driver must reproduce its rounding)."""
    log_p = z - z.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(log_p, dim=-1)
    return -(torch.clamp(log_p, min=torch.finfo(log_p.dtype).min) * probs).sum(-1)


def _as_row_tensor(temperature: float | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        return temperature.to(device=device, dtype=torch.float32).expand(rows)
    return torch.full((rows,), float(temperature), dtype=torch.float32, device=device)


def denoise_stats_ref(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    embed_weight: torch.Tensor | None = None,
    embed_scale: float | None = None,
) -> DenoiseStats:
    """The naive statistics from materialized (already softcapped) logits.

    Args:
        logits: [R, V] softcapped logits (any float dtype; computed in float32).
        temperature: a float or [R] tensor.
        noise: [R, V] Gumbel noise for the sample; None samples argmax(z) (i.e. no noise).
        embed_weight: [V, H] tied embedding for the soft embedding (skipped when None).
        embed_scale: soft-embedding multiplier (sqrt(H) for DiffusionGemma); required with embed_weight.
    """
    temps = _as_row_tensor(temperature, logits.shape[0], logits.device)
    z = logits.float() / temps[:, None]
    log_p = torch.log_softmax(z, dim=-1)
    probs = log_p.exp()
    entropy = -torch.where(probs > 0, probs * log_p, 0.0).sum(-1)  # masked (-inf) columns add nothing
    sample = (z + noise.float()).argmax(-1) if noise is not None else z.argmax(-1)
    soft = None
    if embed_weight is not None:
        if embed_scale is None:
            raise ValueError("embed_scale is required with embed_weight")
        soft = (probs @ embed_weight.float()) * embed_scale
    return DenoiseStats(z.argmax(-1), sample, entropy, probs.max(-1).values, soft)


def fused_denoise_stats(
    hidden: torch.Tensor,
    embed_weight: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    row_ids: torch.Tensor | None = None,
    cap: float | None = 30.0,
    embed_scale: float | torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    backend: Backend = "torch",
) -> DenoiseStats:
    """Unembedding + softcap + statistics without materializing [R, V] logits or probabilities.

    Args:
        hidden: [R, H] final decoder hidden states (model dtype).
        embed_weight: [V, H] tied embedding / lm_head weight (model dtype).
        temperature: a float or [R] tensor (> 0).
        seed: seed of the counter-based Gumbel noise: an int, or a 0-dim int64 tensor on hidden's device
            (an engine step draws it on the device, so nothing is read back to the host).
        row_ids: [R] int64 global row ids for the noise (default arange(R)).
        cap: final logit softcap (30 for DiffusionGemma; None disables it).
        embed_scale: when given (a float or a 0-dim tensor), also return softmax(z) @ E * embed_scale
            (the self-conditioning input).
        chunk_size: vocabulary rows per chunk of the torch path; bounds the temporaries to [R, chunk_size].
        backend: "torch" (any device, a loop over vocabulary chunks), "triton" (two fused kernels,
            `nvfp4_ext.kernels.denoise_stats`), or "auto" (Triton on CUDA when Triton is importable).
    Returns:
        `DenoiseStats`; equals `denoise_stats_ref(softcap(h E^T), T, noise=gumbel_noise(...))` within fp32
        rounding.
    """
    if hidden.dim() != 2 or embed_weight.dim() != 2 or hidden.shape[1] != embed_weight.shape[1]:
        raise ValueError(
            f"expected hidden [R, H] and embed_weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(embed_weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if backend not in ("torch", "triton", "auto"):
        raise ValueError(f"backend must be 'torch', 'triton' or 'auto', got {backend!r}")
    rows, device = hidden.shape[0], hidden.device
    if row_ids is None:
        row_ids = torch.arange(rows, device=device, dtype=torch.int64)
    temps = _as_row_tensor(temperature, rows, device)
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        from nvfp4_ext.kernels.denoise_stats import denoise_stats_triton

        return denoise_stats_triton(
            hidden, embed_weight, temps, seed=seed, row_ids=row_ids, cap=cap, embed_scale=embed_scale
        )
    return _online_stats(
        _chunks_from_hidden(hidden, embed_weight, temps, cap, chunk_size),
        rows,
        hidden.shape[1],
        device,
        row_keys(seed, row_ids),
        embed_scale,
    )


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def logits_denoise_stats(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    row_ids: torch.Tensor | None = None,
    embed_weight: torch.Tensor | None = None,
    embed_scale: float | torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> DenoiseStats:
    """The same statistics from logits an engine already computed, without [R, V] temporaries of its own.

    For engines whose runner hands the sampler softcapped logits: the input stays the only [R, V]
    tensor. Masked (-inf) logits, e.g. from top-k/top-p, get zero probability.

    Args:
        logits: [R, V] softcapped logits.
        temperature, seed, row_ids, chunk_size: as in `fused_denoise_stats`.
        embed_weight, embed_scale: give both to also get the soft embedding softmax(z) @ E * embed_scale.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits [R, V], got {tuple(logits.shape)}")
    if (embed_weight is None) != (embed_scale is None):
        raise ValueError("embed_weight and embed_scale go together")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows, device = logits.shape[0], logits.device
    if row_ids is None:
        row_ids = torch.arange(rows, device=device, dtype=torch.int64)
    temps = _as_row_tensor(temperature, rows, device)
    hidden_size = embed_weight.shape[1] if embed_weight is not None else 0

    def chunks():
        for start in range(0, logits.shape[1], chunk_size):
            z = logits[:, start : start + chunk_size].float() / temps[:, None]
            yield start, z, None if embed_weight is None else embed_weight[start : start + chunk_size]

    return _online_stats(chunks(), rows, hidden_size, device, row_keys(seed, row_ids), embed_scale)


def _chunks_from_hidden(
    hidden: torch.Tensor, embed_weight: torch.Tensor, temps: torch.Tensor, cap: float | None, chunk_size: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    for start in range(0, embed_weight.shape[0], chunk_size):
        weight = embed_weight[start : start + chunk_size]
        z = (hidden @ weight.T).float()  # model-dtype GEMM, like HF's lm_head; softcap in fp32
        if cap is not None:  # HF's softcap, in place to keep one [rows, chunk] buffer
            z.div_(cap).tanh_().mul_(cap)
        yield start, z.div_(temps[:, None]), weight


def _probs_times_weight(weights: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 [R, c] (unnormalized probabilities) @ [c, H] -> [R, H] to add into an fp32 accumulator, never
    upcasting the weight slice: on CUDA a model-dtype GEMM with fp32 output; elsewhere the probabilities
    rounded to the model dtype (as vLLM's built-in step does) and a model-dtype product."""
    if weight.dtype == torch.float32:
        return weights @ weight
    if weight.is_cuda:
        return torch.mm(weights.to(weight.dtype), weight, out_dtype=torch.float32)
    return weights.to(weight.dtype) @ weight


def _online_stats(
    chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor | None]],
    rows: int,
    hidden_size: int,
    device: torch.device,
    keys: torch.Tensor,
    embed_scale: float | torch.Tensor | None,
) -> DenoiseStats:
    """One pass over tempered [R, chunk] blocks with an online max / sum (flash-softmax style); `keys` are
    the rows' noise keys (`row_keys`)."""
    run_max = torch.full((rows,), -torch.inf, device=device)
    run_arg = torch.zeros(rows, dtype=torch.int64, device=device)
    noisy_max = torch.full((rows,), -torch.inf, device=device)
    noisy_arg = torch.zeros(rows, dtype=torch.int64, device=device)
    exp_sum = torch.zeros(rows, device=device)  # sum exp(z - run_max)
    centered = torch.zeros(rows, device=device)  # sum exp(z - run_max) * (z - run_max)
    soft = torch.zeros(rows, hidden_size, device=device) if embed_scale is not None else None
    for start, z, weight in chunks:
        cols = torch.arange(start, start + z.shape[1], device=device)
        noisy = _noise_from_keys(keys, cols).add_(z)
        chunk_noisy, chunk_noisy_arg = noisy.max(dim=-1)
        del noisy
        # Strictly greater keeps the first index on ties, like torch.argmax over the full row.
        better = chunk_noisy > noisy_max
        noisy_max = torch.where(better, chunk_noisy, noisy_max)
        noisy_arg = torch.where(better, chunk_noisy_arg + start, noisy_arg)
        chunk_max, chunk_arg = z.max(dim=-1)
        better = chunk_max > run_max
        new_max = torch.where(better, chunk_max, run_max)
        run_arg = torch.where(better, chunk_arg + start, run_arg)
        # Rows with nothing but -inf so far have zero sums; keep their arithmetic finite.
        seen = torch.isfinite(run_max)
        shift = torch.where(seen, run_max - new_max, 0.0)
        alpha = torch.where(seen, torch.exp(shift), 0.0)
        run_max = new_max
        z.sub_(torch.where(torch.isfinite(run_max), run_max, 0.0)[:, None])
        weights = torch.exp(z)
        z.mul_(weights).nan_to_num_(nan=0.0)  # 0 * -inf of masked columns -> 0
        centered = alpha * (centered + shift * exp_sum) + z.sum(-1)
        exp_sum = alpha * exp_sum + weights.sum(-1)
        if soft is not None:  # in place: [R, H] is large next to the chunk temporaries (H = 2816)
            chunk_soft = _probs_times_weight(weights, weight)
            soft.mul_(alpha[:, None]).add_(chunk_soft)
            del chunk_soft
    entropy = torch.log(exp_sum) - centered / exp_sum
    if soft is not None:
        soft.div_(exp_sum[:, None]).mul_(embed_scale)
    return DenoiseStats(run_arg, noisy_arg, entropy, 1.0 / exp_sum, soft)
