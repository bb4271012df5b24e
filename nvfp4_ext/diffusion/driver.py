"""Reference DiffusionGemma generation on transformers' model, with pluggable policies and fused statistics.

`generate()` runs the block-diffusion loop of transformers 5.19's `DiffusionGemmaForBlockDiffusion.generate`
(shared/reference/diffusiongemma.md §c) around the model's own encoder and decoder modules:

- `stats="hf-exact"` materializes the logits and draws from the global torch RNG in HF's exact order
  (randint canvas, then per step multinomial + randint renoise), and feeds the previous step's tempered
  logits as `self_conditioning_logits`. With the `entropy_bound` policy and the same `torch.manual_seed`,
  the output equals HF's `generate` token for token.
- `stats="fused"` never materializes [rows, vocab]: the decoder returns hidden states, the fused statistics
  give argmax / Gumbel sample / entropy / top probability / soft embedding, and the soft embedding is fed
  to the decoder's self-conditioning block directly (a forward pre-hook replaces the zero signal the decoder
  builds when it gets no logits — HF's decoder only accepts logits, and softmax(z) @ E is all it does
  with them). Randomness comes from a `torch.Generator` and the counter-based Gumbel hash, so results are
  reproducible from `seed` but are a different random stream than HF's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from nvfp4_ext.diffusion.policies import DenoisePolicy, EntropyBoundPolicy
from nvfp4_ext.diffusion.schedule import DenoiseSettings, StabilityTracker, is_confident, temperature
from nvfp4_ext.diffusion.stats import DEFAULT_CHUNK, categorical_entropy, fused_denoise_stats
from nvfp4_ext.errors import ConfigError

__all__ = ["GenerationResult", "StatsMode", "default_policy", "default_settings", "generate"]

StatsMode = Literal["hf-exact", "fused"]


@dataclass
class GenerationResult:
    """Output of `generate`.

    Attributes:
        sequences: [B, P + n_canvas * L] prompt + committed canvases (after EOS: pad), like HF's `sequences`.
        new_tokens: [B, n_canvas * L] the generated part of `sequences`.
        steps: per canvas, per row, the number of decoder forwards that row used.
        accepted: per canvas, per step, per row, how many positions the policy accepted.
    """

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    steps: list[list[int]] = field(default_factory=list)
    accepted: list[list[list[int]]] = field(default_factory=list)

    def to_json(self, row: int = 0) -> dict[str, Any]:
        """`{"token_ids": [...], "steps": [...], "accepted": [...]}` for one batch row."""
        return {
            "token_ids": self.new_tokens[row].tolist(),
            "steps": [canvas[row] for canvas in self.steps],
            "accepted": [[step[row] for step in canvas] for canvas in self.accepted],
        }


def _generation_config(model: Any) -> dict[str, Any]:
    config = getattr(model, "generation_config", None)
    return config.to_dict() if config is not None else {}


def default_settings(model: Any, **overrides: Any) -> DenoiseSettings:
    """The model's generation_config as `DenoiseSettings` (overrides win; None values are ignored)."""
    return DenoiseSettings.from_generation_config(_generation_config(model), **overrides)


def default_policy(model: Any) -> DenoisePolicy:
    """`entropy_bound` with the checkpoint's bound (generation_config.sampler_config.entropy_bound)."""
    sampler = _generation_config(model).get("sampler_config") or {}
    if not isinstance(sampler, dict):
        sampler = getattr(sampler, "__dict__", {})
    bound = sampler.get("entropy_bound")
    return EntropyBoundPolicy(bound=float(bound)) if bound is not None else EntropyBoundPolicy()


class _SoftEmbeddingInjector:
    """Forward pre-hook on the decoder's self-conditioning block: swaps in a precomputed soft embedding."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.soft: torch.Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if self.soft is None:
            return None
        inputs_embeds, signal = args
        return inputs_embeds, self.soft.to(signal.dtype)

    def remove(self) -> None:
        self._handle.remove()


def _resolve_max_new_tokens(model: Any, max_new_tokens: int | None) -> int:
    value = max_new_tokens if max_new_tokens is not None else _generation_config(model).get("max_new_tokens")
    value = 256 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_new_tokens: must be an integer >= 1, got {value!r}")
    return value


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    *,
    settings: DenoiseSettings | None = None,
    policy: DenoisePolicy | None = None,
    max_new_tokens: int | None = None,
    stats: StatsMode = "hf-exact",
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> GenerationResult:
    """Generate with a transformers `DiffusionGemmaForBlockDiffusion` (text prompts).

    Args:
        model: the HF model in eval mode.
        input_ids: [B, P] int64 prompt ids (left-padded with `attention_mask` for batches).
        settings: schedule and stopping knobs (default: the model's generation_config).
        policy: acceptance policy (default: entropy_bound with the checkpoint's bound).
        max_new_tokens: default generation_config.max_new_tokens; rounded up to whole canvases.
        stats: "hf-exact" (HF's RNG stream and logits) or "fused" (memory-lean statistics).
        seed: hf-exact: calls `torch.manual_seed(seed)` first when given (else uses the global RNG as is);
            fused: seeds a private generator (default 0).
        attention_mask: [B, P] 0/1 mask of real prompt tokens.
        chunk_size: vocabulary chunk of the fused statistics.
    Returns:
        `GenerationResult`.
    """
    if stats not in ("hf-exact", "fused"):
        raise ConfigError(f"stats: must be 'hf-exact' or 'fused', got {stats!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError(
            f"input_ids: expected a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}"
        )
    config = model.config
    text_config = config.get_text_config(decoder=True)
    vocab, canvas_len = text_config.vocab_size, config.canvas_length
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ConfigError(
            f"input_ids: token ids must lie in [0, {vocab}), got {int(input_ids.min())}.."
            f"{int(input_ids.max())}"
        )
    settings = settings or default_settings(model)
    policy = policy or default_policy(model)
    max_new_tokens = _resolve_max_new_tokens(model, max_new_tokens)
    gen_config = _generation_config(model)
    pad_id = gen_config.get("pad_token_id")
    eos = gen_config.get("eos_token_id")
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)

    from transformers import DynamicCache

    device = input_ids.device
    batch, prompt_len = input_ids.shape
    max_length = prompt_len + max_new_tokens
    generator = None
    if stats == "hf-exact":
        if seed is not None:
            torch.manual_seed(seed)
    else:
        generator = torch.Generator(device=device).manual_seed(0 if seed is None else seed)

    def randint_canvas() -> torch.Tensor:
        return torch.randint(0, vocab, (batch, canvas_len), device=device, generator=generator)

    encoder, decoder = model.model.encoder, model.model.decoder
    embed = decoder.embed_tokens
    embed_scale = float(embed.embed_scale)
    cap = getattr(text_config, "final_logit_softcapping", None)
    cache = DynamicCache(config=text_config)
    enc_pos = torch.arange(0, prompt_len, dtype=torch.int32, device=device)[None]
    dec_pos = torch.arange(prompt_len, prompt_len + canvas_len, dtype=torch.int32, device=device)[None]
    mask = (
        attention_mask.bool()
        if attention_mask is not None
        else torch.ones(batch, prompt_len, dtype=torch.bool, device=device)
    )
    dec_mask = torch.nn.functional.pad(mask, (0, canvas_len), value=True)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tracker = StabilityTracker(settings.stability_threshold)
    injector = _SoftEmbeddingInjector(decoder.self_conditioning) if stats == "fused" else None
    result = GenerationResult(sequences=input_ids, new_tokens=input_ids[:, :0])
    sequences, cur_len = input_ids, prompt_len
    try:
        for canvas_idx in range(math.ceil(max_new_tokens / canvas_len)):
            to_encode = (sequences if canvas_idx == 0 else sequences[:, -canvas_len:]).contiguous()
            enc_masks = encoder.create_masks_for_generate(
                config=config,
                inputs_embeds=torch.empty((batch, to_encode.shape[1], 0), dtype=model.dtype, device=device),
                attention_mask=mask,
                past_key_values=cache,
                position_ids=enc_pos,
                mm_token_type_ids=None,
            )
            encoder(
                input_ids=to_encode, attention_mask=enc_masks, past_key_values=cache, position_ids=enc_pos
            )

            canvas = randint_canvas()
            argmax_canvas = canvas
            dec_masks = decoder.create_diffusion_decoder_attention_mask(
                config=config,
                inputs_embeds=canvas.unsqueeze(-1),
                past_key_values=cache,
                decoder_attention_mask=dec_mask,
            )
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            tracker.reset()
            steps_used = torch.zeros(batch, dtype=torch.int64, device=device)
            sc_logits: torch.Tensor | None = None
            soft: torch.Tensor | None = None
            accepted_log: list[list[int]] = []
            for steps_remaining in range(settings.max_denoising_steps, 0, -1):
                steps_used += ~(done | finished)
                temp = temperature(steps_remaining, settings)
                if stats == "hf-exact":
                    logits = model(
                        decoder_input_ids=canvas,
                        self_conditioning_logits=sc_logits,
                        decoder_attention_mask=dec_masks,
                        past_key_values=cache,
                        decoder_position_ids=dec_pos,
                    ).logits
                    z = logits / temp
                    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
                    sample = torch.multinomial(probs.view(-1, vocab), num_samples=1).view(batch, canvas_len)
                    new_argmax = z.argmax(dim=-1)
                    entropy = categorical_entropy(z)
                    top_prob = probs.max(dim=-1).values
                    del probs
                else:
                    injector.soft = soft
                    hidden = decoder(
                        decoder_input_ids=canvas,
                        past_key_values=cache,
                        decoder_attention_mask=dec_masks,
                        decoder_position_ids=dec_pos,
                    ).last_hidden_state
                    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
                    step_stats = fused_denoise_stats(
                        hidden.reshape(-1, hidden.shape[-1]),
                        embed.weight,
                        temp,
                        seed=noise_seed,
                        cap=cap,
                        embed_scale=embed_scale,
                        chunk_size=chunk_size,
                    )
                    shape = (batch, canvas_len)
                    sample, new_argmax = step_stats.sample.view(shape), step_stats.argmax.view(shape)
                    entropy, top_prob = step_stats.entropy.view(shape), step_stats.top_prob.view(shape)
                accept = policy.accept(entropy, top_prob)
                accepted_log.append(accept.sum(-1).tolist())
                new_canvas = torch.where(accept, sample, canvas)
                new_canvas = torch.where(~accept, randint_canvas(), new_canvas)
                if done.any():  # rows that already converged keep their canvas (HF freezes them)
                    new_argmax = torch.where(done[:, None], argmax_canvas, new_argmax)
                    new_canvas = torch.where(done[:, None], canvas, new_canvas)
                    if stats == "hf-exact":
                        z = torch.where(done[:, None, None], sc_logits, z)
                        entropy = categorical_entropy(z)
                was_done = done.clone()
                done |= tracker.update(new_argmax) & is_confident(entropy, settings.confidence_threshold)
                if stats == "hf-exact":
                    sc_logits = z.to(embed.weight.dtype)
                else:
                    new_soft = step_stats.soft_embedding.view(batch, canvas_len, -1)
                    soft = new_soft if soft is None else torch.where(was_done[:, None, None], soft, new_soft)
                canvas, argmax_canvas = new_canvas, new_argmax
                if bool(done.all()):
                    break
            result.steps.append(steps_used.tolist())
            result.accepted.append(accepted_log)

            sequences = torch.cat([sequences, argmax_canvas], dim=-1)
            sequences, finished = _finalize_canvas(
                sequences, finished, canvas_len, max_length, eos_ids, pad_id
            )
            if bool(finished.all()):
                break
            cur_len += canvas_len
            dec_mask = torch.nn.functional.pad(dec_mask, (0, canvas_len), value=True)
            mask = torch.nn.functional.pad(mask, (0, canvas_len), value=True)
            enc_pos = dec_pos
            dec_pos = torch.arange(cur_len, cur_len + canvas_len, dtype=torch.int32, device=device)[None]
    finally:
        if injector is not None:
            injector.remove()
    result.sequences = sequences
    result.new_tokens = sequences[:, prompt_len:]
    return result


def _finalize_canvas(
    sequences: torch.Tensor,
    finished: torch.Tensor,
    canvas_len: int,
    max_length: int,
    eos_ids: torch.Tensor,
    pad_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `_finalize_canvas`: stop rows at max length or with an EOS in the new canvas; pad after EOS."""
    new = sequences[:, -canvas_len:]
    has_eos = torch.isin(new, eos_ids) if eos_ids.numel() else torch.zeros_like(new, dtype=torch.bool)
    this_canvas = has_eos.any(-1) | (sequences.shape[-1] >= max_length)
    previously = finished
    finished = previously | this_canvas
    if pad_id is not None and bool(finished.any()):
        sequences[previously, -canvas_len:] = pad_id
        if eos_ids.numel() and bool(this_canvas.any()):
            new = sequences[:, -canvas_len:]
            is_eos = torch.isin(new, eos_ids)
            eos_cumsum = is_eos.cumsum(dim=-1)
            new[(eos_cumsum > 0) & ~((eos_cumsum == 1) & is_eos)] = pad_id
    return sequences, finished
