"""The batched, slot-indexed denoise step an engine runs once per scheduler step (pure torch).

Same state layout and semantics as vLLM 0.32's `_compiled_sample_step` (models/diffusion_gemma.py:444-631,
see shared/reference/vllm-integration.md §6), with changes that make it pluggable, memory-lean and
free of host syncs:
  * the accepted positions come in as a mask (any `DenoisePolicy`, batched by `batched_accept` from
    per-row device codes), not as a hard-coded entropy bound;
  * the self-conditioning soft embedding comes in precomputed ([n, CL, H], from `fused_denoise_stats`),
    instead of [n, CL, vocab] probabilities;
  * `hidden_denoise_step` goes from the decoder's hidden states to the updated state: statistics without
    [rows, vocab] tensors, policy masks and the state update, with every input a device tensor (seed,
    temperatures, policies, normalizer) and no data-dependent op, so it runs under FakeTensorMode and
    compiles with fullgraph.
With the `entropy_bound` mask and `soft = probs @ E * normalizer` it updates the state exactly as vLLM's
step does (tests/test_diffusion_vllm.py runs vLLM's own function against it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nvfp4_ext.diffusion.policies import batched_accept
from nvfp4_ext.diffusion.stats import DEFAULT_CHUNK, Backend, fused_denoise_stats

__all__ = ["accept_and_update", "batched_denoise_step", "hidden_denoise_step"]


def batched_denoise_step(
    new_tokens: torch.Tensor,
    argmax_tokens: torch.Tensor,
    token_entropy: torch.Tensor,
    accept_mask: torch.Tensor,
    soft_embeds: torch.Tensor | None,
    decode_slots: torch.Tensor,
    decode_idx: torch.Tensor,
    all_slots: torch.Tensor,
    valid_canvas_len: torch.Tensor,
    canvas: torch.Tensor,
    argmax_canvas: torch.Tensor,
    step_tensor: torch.Tensor,
    is_encoder_phase: torch.Tensor,
    confident_tensor: torch.Tensor,
    sc_embeds: torch.Tensor,
    history: torch.Tensor,
    history_len_tensor: torch.Tensor,
    max_steps_tensor: torch.Tensor,
    pin_mask: torch.Tensor,
    seed_canvas: torch.Tensor,
    read_only: torch.Tensor,
    sampled: torch.Tensor,
    num_sampled: torch.Tensor,
    draft_tokens: torch.Tensor,
    *,
    confidence_threshold: float,
    vocab_size: int,
    canvas_length: int,
    stability_slots: int,
) -> None:
    """Confidence -> accept/renoise -> history -> convergence -> emit -> self-conditioning, in place.

    Args:
        new_tokens, argmax_tokens, token_entropy, accept_mask: [n, CL] per decode request (sample, argmax,
            entropy of the tempered distribution, accepted positions).
        soft_embeds: [n, CL, H] softmax @ E * normalizer (overwritten: masked in place), or None when no
            slot denoises again.
        decode_slots / decode_idx / all_slots / valid_canvas_len: request mapping (as in vLLM).
        canvas ... read_only: per-slot state tensors, updated in place (vLLM's DiffusionGemmaRequestStates).
        sampled, num_sampled, draft_tokens: outputs, updated in place.
        stability_slots: ST = stability_threshold + 1 (the ring includes the current step).
    """
    num_decode, device = decode_slots.shape[0], decode_slots.device
    confident_tensor[decode_slots] = token_entropy.mean(dim=-1) < confidence_threshold

    is_commit = is_encoder_phase[decode_slots]
    is_denoise = ~is_commit
    cur_step = step_tensor[decode_slots].float()
    step_tensor[decode_slots] = torch.where(
        is_denoise, (cur_step + 1).to(step_tensor.dtype), step_tensor.new_zeros(num_decode)
    )

    # One draw of uniform noise serves both renoising and a committed slot's fresh canvas (vLLM's order).
    random_tokens = torch.randint(
        0, vocab_size, (num_decode, canvas_length), device=device, dtype=canvas.dtype
    )
    denoise_canvas = torch.where(accept_mask, new_tokens, random_tokens)
    denoise_canvas = torch.where(pin_mask[decode_slots], seed_canvas[decode_slots], denoise_canvas)
    canvas[decode_slots] = torch.where(is_commit.unsqueeze(1), random_tokens, denoise_canvas)

    hist_len = history_len_tensor[decode_slots]
    write_pos = hist_len % stability_slots
    for i in range(stability_slots):
        write_here = ((write_pos == i) & is_denoise).unsqueeze(1)
        history[decode_slots, i] = torch.where(write_here, argmax_tokens, history[decode_slots, i])
    argmax_canvas[decode_slots] = torch.where(
        is_denoise.unsqueeze(1), argmax_tokens, argmax_canvas[decode_slots]
    )
    new_hist_len = torch.where(is_denoise, hist_len + 1, hist_len.new_zeros(num_decode))
    history_len_tensor[decode_slots] = new_hist_len

    reference = history[decode_slots, 0]
    mismatch = torch.zeros(num_decode, device=device, dtype=torch.int32)
    for h in range(1, stability_slots):
        mismatch = mismatch + (reference != history[decode_slots, h]).sum(dim=-1).int()
    converged = ((mismatch == 0) & confident_tensor[decode_slots] & (new_hist_len >= stability_slots)) | (
        step_tensor[decode_slots] >= max_steps_tensor[decode_slots]
    )
    is_encoder_phase[decode_slots] = torch.where(is_commit, is_commit.new_zeros(num_decode), converged)

    emit = is_commit | (is_denoise & converged & read_only[decode_slots])
    sampled[decode_idx] = argmax_canvas[decode_slots].to(sampled.dtype) * emit[:, None]
    num_sampled[decode_idx] = (emit * valid_canvas_len).to(num_sampled.dtype)

    # Keep the soft embedding only for slots that denoise again; pinned positions get none (their input is
    # the seed, and the model's own guess must not leak back through self-conditioning).
    if soft_embeds is None:
        sc_embeds[decode_slots] = 0
    else:
        keep = (is_denoise & ~is_encoder_phase[decode_slots])[:, None, None]
        unpinned = (~pin_mask[decode_slots]).unsqueeze(-1)
        # in place: the soft embedding is this step's own buffer, and a product would be one more [n, CL, H]
        sc_embeds[decode_slots] = soft_embeds.mul_(keep & unpinned).to(sc_embeds.dtype)

    newly_converged = (converged & is_denoise).unsqueeze(1)
    canvas[decode_slots] = torch.where(newly_converged, argmax_canvas[decode_slots], canvas[decode_slots])
    is_encoder_phase[decode_slots] &= ~read_only[decode_slots]
    draft_tokens[all_slots, :canvas_length] = canvas[all_slots]


def hidden_denoise_step(
    hidden: torch.Tensor,
    embed_weight: torch.Tensor,
    temps: torch.Tensor,
    seed: torch.Tensor,
    policy_codes: torch.Tensor,
    policy_params: torch.Tensor,
    normalizer: torch.Tensor | None,
    *state: torch.Tensor,
    cap: float | None,
    confidence_threshold: float,
    vocab_size: int,
    canvas_length: int,
    stability_slots: int,
    chunk_size: int = DEFAULT_CHUNK,
    backend: Backend = "auto",
    update: Callable[..., None] | None = None,
) -> None:
    """One denoise step of n requests from their hidden states, in place (see `batched_denoise_step`).

    Args:
        hidden: [n * CL, H] final decoder hidden states, request-major; embed_weight: [V, H] tied embedding.
        temps: [n] float32 per-request temperature; seed: 0-dim int64 device tensor (Gumbel noise key).
        policy_codes, policy_params: [n] device tensors from `encode_policies`.
        normalizer: 0-dim tensor, the soft-embedding scale (sqrt(H)), or None when no request denoises
            again (no self-conditioning: the soft embedding is skipped).
        state: decode_slots, decode_idx, all_slots, valid_canvas_len, then the per-slot state and outputs
            (canvas ... draft_tokens), as in `batched_denoise_step`.
        cap: final logit softcap; chunk_size, backend: of the statistics (`fused_denoise_stats`).
        update: `accept_and_update` or a compiled form of it (default: the eager function).
    """
    num_decode = state[0].shape[0]
    row_temps = temps.repeat_interleave(canvas_length, output_size=num_decode * canvas_length)
    stats = fused_denoise_stats(
        hidden,
        embed_weight,
        row_temps,
        seed=seed,
        cap=cap,
        embed_scale=normalizer,
        chunk_size=chunk_size,
        backend=backend,
    )
    shape = (num_decode, canvas_length)
    soft = stats.soft_embedding
    (update or accept_and_update)(
        stats.sample.view(shape),
        stats.argmax.view(shape),
        stats.entropy.view(shape),
        stats.top_prob.view(shape),
        policy_codes,
        policy_params,
        None if soft is None else soft.view(num_decode, canvas_length, -1),
        *state,
        confidence_threshold=confidence_threshold,
        vocab_size=vocab_size,
        canvas_length=canvas_length,
        stability_slots=stability_slots,
    )


def accept_and_update(
    new_tokens: torch.Tensor,
    argmax_tokens: torch.Tensor,
    token_entropy: torch.Tensor,
    top_prob: torch.Tensor,
    policy_codes: torch.Tensor,
    policy_params: torch.Tensor,
    soft_embeds: torch.Tensor | None,
    *state: torch.Tensor,
    confidence_threshold: float,
    vocab_size: int,
    canvas_length: int,
    stability_slots: int,
) -> None:
    """`batched_accept` + `batched_denoise_step`: the part of a step after the statistics ([n, CL] inputs;
    `state` = decode_slots ... draft_tokens as in `batched_denoise_step`). Engines compile this function."""
    batched_denoise_step(
        new_tokens,
        argmax_tokens,
        token_entropy,
        batched_accept(policy_codes, policy_params, token_entropy, top_prob),
        soft_embeds,
        *state,
        confidence_threshold=confidence_threshold,
        vocab_size=vocab_size,
        canvas_length=canvas_length,
        stability_slots=stability_slots,
    )
