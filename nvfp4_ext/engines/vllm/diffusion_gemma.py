"""DiffusionGemma for vLLM with per-request denoise policies and a memory-lean sampler step.

`Nvfp4ExtDiffusionGemma` subclasses vLLM's `DiffusionGemmaForConditionalGeneration` (registered for the
architecture `DiffusionGemmaForBlockDiffusion`); its model state hands the model runner our sampler:

- default behaviour = vLLM's built-in: the `entropy_bound` policy with the checkpoint's bound, the same
  schedule, stopping rule, commit/emit protocol and `diffusion_*` extra_args (state updates are the same
  ops as vLLM's `_compiled_sample_step`, see `nvfp4_ext.diffusion.batched`);
- `extra_args` `diffusion_policy` (`entropy_bound` | `confidence` | `fixed_k`) and `diffusion_policy_<param>`
  (`bound`, `threshold`, `k`) choose the policy per request; bad values are rejected at admission with
  HTTP 400 naming the key (`install_admission_validation`);
- no fp32 [rows, vocab] tensor at all (vLLM keeps several per step, ~2.1 GB per 256-token canvas): the
  statistics come straight from the sampled hidden states and the tied LM head (`hidden_denoise_step`: the
  Triton `denoise_stats` kernels on GPU, vocabulary chunks in torch elsewhere). vLLM 0.34 hands the sampler
  the hidden states; on 0.32/0.33 our model's `compute_logits` returns `DeferredLogits` (the hidden states,
  turned into the real logits only if something other than our sampler uses them). Requests with top-k /
  top-p (their filter needs the logits), tensor parallelism (a vocab-sharded head) and an untied or
  quantized head use the logits, still in vocab chunks; steps that need vLLM's logprob stash or constrained
  vocabularies run the built-in path (only the default policy may be combined with them; admission
  enforces it);
- no host sync in the step: seed, temperatures, policies (per-row codes, pinned non-blocking copies) and
  the normalizer stay on the device; the state update (`accept_and_update`) is compiled like vLLM's
  `_compiled_sample_step`.

Supports vLLM 0.32-0.34; what differs between them (the top-k/top-p API, 0.34 handing the sampler hidden
states that each width tile projects to logits itself) sits in `_vllm_compat`.

NVFP4 experts and linears come from the `nvfp4_ext` quantization method; the embedding / tied lm_head,
self-conditioning MLP and vision tower are untouched (BF16). Model runner V2 needs GPU Triton, so this runs
on GPUs only; on CPU the pure-torch parts are tested directly. vLLM is imported lazily: the classes are
built on first attribute access.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from nvfp4_ext.diffusion.batched import accept_and_update, hidden_denoise_step
from nvfp4_ext.diffusion.policies import (
    DEFAULT_POLICY,
    DenoisePolicy,
    EntropyBoundPolicy,
    encode_policies,
    policy_from_mapping,
)
from nvfp4_ext.diffusion.stats import DEFAULT_CHUNK, logits_denoise_stats
from nvfp4_ext.engines.vllm import _vllm_compat
from nvfp4_ext.engines.vllm.deferred_logits import DeferredLogits, materialize
from nvfp4_ext.errors import ConfigError

__all__ = [
    "ARCHITECTURE",
    "Nvfp4ExtDiffusionGemma",  # noqa: F822 (built lazily by __getattr__)
    "Nvfp4ExtDiffusionGemmaModelState",  # noqa: F822
    "Nvfp4ExtDiffusionSampler",  # noqa: F822
    "install_admission_validation",
    "request_policy",
    "validate_policy_request",
]

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
EXTRA_ARG_PREFIX = "diffusion_"
_POLICY_KEY = f"{EXTRA_ARG_PREFIX}policy"


def _has_policy_keys(extra_args: Mapping[str, Any]) -> bool:
    return any(key == _POLICY_KEY or key.startswith(f"{_POLICY_KEY}_") for key in extra_args)


def request_policy(extra_args: Mapping[str, Any] | None, default_bound: float | None = None) -> DenoisePolicy:
    """The policy a request's `extra_args` select (the checkpoint's entropy bound by default).

    Raises:
        ConfigError: naming the key, e.g. `diffusion_policy_k: ...`.
    """
    defaults = {"bound": default_bound} if default_bound is not None else None
    return policy_from_mapping(extra_args or {}, prefix=EXTRA_ARG_PREFIX, default_params=defaults)


def validate_policy_request(
    extra_args: Mapping[str, Any] | None, *, wants_logprobs: bool = False, constrained: bool = False
) -> None:
    """Admission check of the policy keys (no-op without them)."""
    extra_args = extra_args or {}
    if not _has_policy_keys(extra_args):
        return
    policy = request_policy(extra_args)
    if policy.name != DEFAULT_POLICY and (wants_logprobs or constrained):
        feature = "logprobs" if wants_logprobs else "diffusion_constrained"
        raise ConfigError(
            f"{_POLICY_KEY}: policy {policy.name!r} cannot be combined with {feature}; use {DEFAULT_POLICY!r}"
        )


def install_admission_validation() -> None:
    """Wrap vLLM's diffusion request validation (API process) so bad policy extra_args become HTTP 400.

    Idempotent; call it from the `vllm.general_plugins` entry point. A sentinel attribute marks the wrapper.
    """
    import vllm.v1.engine.input_processor as input_processor
    from vllm.exceptions import VLLMValidationError

    original = input_processor.validate_diffusion_sampling_params
    if getattr(original, "_nvfp4_ext_policy_validation", False):
        return

    @functools.wraps(original)
    def validate(params: Any, *, canvas_length: int | None, vocab_size: int) -> None:
        original(params, canvas_length=canvas_length, vocab_size=vocab_size)
        extra = params.extra_args or {}
        try:
            validate_policy_request(
                extra,
                wants_logprobs=params.logprobs is not None
                or bool(getattr(params, "logprob_token_ids", None)),
                constrained=bool(extra.get("diffusion_constrained")),
            )
        except ConfigError as exc:
            key = str(exc).split(":", 1)[0]
            raise VLLMValidationError(str(exc), parameter=key, value=extra.get(key)) from None

    validate._nvfp4_ext_policy_validation = True  # type: ignore[attr-defined]
    input_processor.validate_diffusion_sampling_params = validate


def _local_soft_embedding(
    logits: torch.Tensor,
    temps: torch.Tensor,
    argmax: torch.Tensor,
    top_prob: torch.Tensor,
    embed_shard: torch.Tensor,
    start: int,
    end: int,
    chunk: int,
) -> torch.Tensor:
    """This rank's share of softmax(z) @ E under vocab-parallel TP: p = exp(z - z_max) * top_prob."""
    z_max = logits.gather(1, argmax[:, None]).float() / temps[:, None]
    soft = torch.zeros(logits.shape[0], embed_shard.shape[1], device=logits.device)
    for lo in range(start, end, chunk):
        hi = min(lo + chunk, end)
        weights = torch.exp(logits[:, lo:hi].float() / temps[:, None] - z_max)
        soft += weights @ embed_shard[lo - start : hi - start].float()
    return soft * top_prob[:, None]


@functools.cache
def _compiled_update() -> Any:
    """`accept_and_update` compiled as vLLM compiles its `_compiled_sample_step` (dynamic shapes, the
    platform's simple backend; TORCHDYNAMO_DISABLE=1 runs it eagerly)."""
    from vllm.platforms import current_platform

    compiled = torch.compile(accept_and_update, dynamic=True, backend=current_platform.simple_compile_backend)
    return torch._dynamo.config.patch(recompile_limit=64)(compiled)


def lean_head(model: Any, sampler: Any) -> tuple[torch.Tensor, float | None] | None:
    """(LM head weight [vocab, H], final softcap) when the statistics can come from hidden states: one TP
    rank, the head tied to the embedding the sampler self-conditions with, in a float dtype. Else None."""
    weight = getattr(getattr(model, "lm_head", None), "weight", None)
    embed = getattr(sampler, "embed_weight", None)
    if (
        not isinstance(weight, torch.Tensor)
        or not isinstance(embed, torch.Tensor)
        or not hasattr(model, "final_logit_softcapping")
        or sampler.tp_size != 1
        or weight.dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or weight.data_ptr() != embed.data_ptr()
        or weight.shape[0] < sampler.vocab_size
    ):
        return None
    return weight[: sampler.vocab_size], model.final_logit_softcapping


def _build_classes() -> dict[str, type]:
    from vllm.model_executor.models import diffusion_gemma as vdg
    from vllm.utils.torch_utils import async_tensor_h2d

    class Nvfp4ExtDiffusionSampler(vdg.DiffusionSampler):
        """vLLM's DiffusionSampler with per-request policies and chunked statistics."""

        chunk_size: int = DEFAULT_CHUNK

        @classmethod
        def from_builtin(cls, builtin: Any) -> Nvfp4ExtDiffusionSampler:
            sampler = cls.__new__(cls)
            sampler.__dict__.update(builtin.__dict__)
            sampler._policies = {}
            sampler._default_policy = EntropyBoundPolicy(bound=float(builtin.entropy_bound))
            sampler.lean_head = None  # set by the model state when the statistics can use hidden states
            return sampler

        def add_request(self, req_idx: int, sampling_params: Any) -> None:
            super().add_request(req_idx, sampling_params)
            try:
                policy = request_policy(getattr(sampling_params, "extra_args", None), self.entropy_bound)
            except ConfigError as exc:  # admission validates first; this guards direct engine use
                raise ValueError(str(exc)) from None
            self._policies[req_idx] = policy

        def _needs_builtin(self, slots_np: np.ndarray) -> bool:
            states = self.diffusion_states
            wants_logprobs = (
                self.sampling_states.max_num_logprobs(slots_np) >= 0
                or self.logprob_token_ids_state.max_num_token_ids(slots_np) > 0
            )
            return states.step_allowed is not None or bool(states.constrained) or wants_logprobs

        def __call__(self, rows: torch.Tensor, input_batch: Any, draft_logits: torch.Tensor | None = None):
            """One engine step. `rows` are the logits (vLLM <= 0.33) or the sampled hidden states that
            each tile projects to logits itself (vLLM >= 0.34, see `_vllm_compat`)."""
            num_reqs, device = input_batch.num_reqs, rows.device
            if input_batch.num_draft_tokens == 0:
                return self._handle_prefill(input_batch, device)
            slots_np = input_batch.idx_mapping_np[:num_reqs]
            if self._needs_builtin(slots_np):
                return super().__call__(materialize(rows), input_batch, draft_logits)
            states = self.diffusion_states
            per_req_nlogits_np = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
            decode_indices_np = np.where(per_req_nlogits_np > 0)[0]
            prefill_indices_np = np.where(per_req_nlogits_np == 0)[0]
            if len(prefill_indices_np) > 0:
                self._finish_prefills(input_batch, prefill_indices_np)
            decode_slots_np = slots_np[decode_indices_np]
            decode_slots = async_tensor_h2d(decode_slots_np.astype(np.int64), device=device)
            decode_idx = async_tensor_h2d(decode_indices_np.astype(np.int64), device=device)
            valid_len_np = per_req_nlogits_np[per_req_nlogits_np > 0]
            valid_len = async_tensor_h2d(valid_len_np.astype(np.int64), device=device)
            row_starts_np = np.concatenate(([0], np.cumsum(valid_len_np)[:-1])).astype(np.int64)
            sampled, num_sampled = self._sampled[:num_reqs], self._num_sampled[:num_reqs]
            sampled.zero_()
            num_sampled.zero_()
            all_slots = input_batch.idx_mapping[:num_reqs]
            widths_np = states.canvas_width_np[decode_slots_np]
            for width in sorted(set(widths_np.tolist())):
                sel_np = np.where(widths_np == width)[0]
                self._denoise_tile(
                    rows,
                    sel_np,
                    int(width),
                    decode_slots,
                    decode_slots_np,
                    decode_idx,
                    valid_len,
                    valid_len_np,
                    row_starts_np,
                    all_slots,
                    sampled,
                    num_sampled,
                )
            return self._build_output(input_batch, sampled, num_sampled, per_req_nlogits_np, device)

        def _tile_logits(
            self,
            rows: torch.Tensor,
            sel: torch.Tensor,
            sel_np: np.ndarray,
            tile_slots: torch.Tensor,
            width: int,
            decode_slots_np: np.ndarray,
            valid_len: torch.Tensor,
            valid_len_np: np.ndarray,
            row_starts_np: np.ndarray,
        ) -> torch.Tensor:
            """[n * width, vocab] logits of the tile's requests, padded to `width`, after top-k/top-p.

            Phantom positions of a truncated canvas get zero logits (uniform, never committed), also
            after the filter, as in vLLM."""
            device, n = rows.device, len(sel_np)
            phantom = None
            if bool((np.diff(sel_np) == 1).all()) and int(valid_len_np[sel_np].min()) == width:
                first = int(row_starts_np[sel_np[0]])  # the common case: a view, no copy
                tile_rows = materialize(rows)[first : first + n * width]
            else:
                positions = torch.arange(width, device=device)
                starts = async_tensor_h2d(row_starts_np[sel_np], device=device)
                src = (starts[:, None] + positions[None]).clamp_max(rows.shape[0] - 1).reshape(-1)
                phantom = (positions[None] >= valid_len[sel][:, None]).reshape(-1, 1)
                tile_rows = materialize(rows)[src].masked_fill_(phantom, 0)
            project = _vllm_compat.logits_projection(self)
            tile_logits = project(tile_rows) if project is not None else materialize(tile_rows)
            expanded = tile_slots.repeat_interleave(width, output_size=n * width)
            tile_logits = _vllm_compat.apply_top_k_top_p(
                self.sampling_states, tile_logits, expanded, decode_slots_np[sel_np]
            )
            if phantom is not None:  # a gathered copy, so in place is safe
                tile_logits.masked_fill_(phantom, 0)
            return tile_logits

        def _denoise_tile(
            self,
            rows,
            sel_np,
            width,
            decode_slots,
            decode_slots_np,
            decode_idx,
            valid_len,
            valid_len_np,
            row_starts_np,
            all_slots,
            sampled,
            num_sampled,
        ) -> None:
            states, device, n = self.diffusion_states, rows.device, len(sel_np)
            sel = async_tensor_h2d(sel_np.astype(np.int64), device=device)
            tile_slots = decode_slots[sel]
            hidden = self._hidden_rows(rows)
            if hidden is not None and not _vllm_compat.uses_top_k_top_p(
                self.sampling_states, decode_slots_np[sel_np]
            ):
                self._denoise_tile_hidden(
                    hidden, sel, sel_np, tile_slots, width, decode_slots_np, decode_idx, valid_len,
                    valid_len_np, row_starts_np, all_slots, sampled, num_sampled,
                )  # fmt: skip
                return
            tile_logits = self._tile_logits(
                rows, sel, sel_np, tile_slots, width, decode_slots_np, valid_len, valid_len_np, row_starts_np
            )
            compute_sc = not states.single_step_slots or not states.single_step_slots.issuperset(
                decode_slots_np[sel_np].tolist()
            )
            temp = vdg._denoise_temperature(
                states.step, tile_slots, float(states.max_denoising_steps), self.t_min, self.t_max
            )
            row_temps = temp.repeat_interleave(width)
            seed = torch.randint(0, 2**31 - 1, (1,), device=device)[0]  # no host round trip
            full_vocab_sc = compute_sc and self.tp_size == 1
            stats = logits_denoise_stats(
                tile_logits,
                row_temps,
                seed=seed,
                chunk_size=self.chunk_size,
                embed_weight=self.embed_weight if full_vocab_sc else None,
                embed_scale=self.normalizer if full_vocab_sc else None,
            )
            soft = stats.soft_embedding
            if compute_sc and self.tp_size > 1:
                soft = _local_soft_embedding(
                    tile_logits,
                    row_temps,
                    stats.argmax,
                    stats.top_prob,
                    self.embed_weight,
                    self.sc_vocab_start,
                    self.sc_vocab_end,
                    self.chunk_size,
                )
                soft = torch.ops.vllm.all_reduce(soft, group_name=self.tp_group_name) * self.normalizer
            _compiled_update()(
                stats.sample.view(n, width),
                stats.argmax.view(n, width),
                stats.entropy.view(n, width),
                stats.top_prob.view(n, width),
                *self._tile_policies(decode_slots_np[sel_np], device),
                soft.view(n, width, -1) if soft is not None else None,
                *self._tile_state(
                    tile_slots, decode_idx[sel], all_slots, valid_len[sel], width, sampled, num_sampled
                ),
                confidence_threshold=self.confidence_threshold,
                vocab_size=self.vocab_size,
                canvas_length=width,
                stability_slots=states.stability_threshold,
            )

        def _hidden_rows(self, rows: Any) -> torch.Tensor | None:
            """The sampled hidden states when this step can skip the logits: our model's `DeferredLogits`
            (vLLM <= 0.33) or the rows themselves (vLLM >= 0.34 hands hidden states); None otherwise."""
            if self.lean_head is None:
                return None
            if isinstance(rows, DeferredLogits):
                return rows.hidden
            return rows if _vllm_compat.logits_projection(self) is not None else None

        def _tile_state(
            self, tile_slots, tile_idx, all_slots, tile_valid, width, sampled, num_sampled
        ) -> tuple:
            """The tile's request mapping, the per-slot state at the tile's width and the outputs, in
            `batched_denoise_step`'s order."""
            states = self.diffusion_states
            return (
                tile_slots,
                tile_idx,
                all_slots,
                tile_valid,
                states.canvas[:, :width],
                states.argmax_canvas[:, :width],
                states.step,
                states.is_encoder_phase,
                states.confident,
                states.self_conditioning_embeds[:, :width],
                states.accepted_canvas_history[:, :, :width],
                states.accepted_canvas_history_len,
                states.max_steps,
                states.pin_mask[:, :width],
                states.seed_canvas[:, :width],
                states.read_only,
                sampled[:, :width],
                num_sampled,
                self.req_states.draft_tokens,
            )

        def _tile_policies(self, slots_np: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
            """Per-row policy codes and parameters on the device (pinned, non-blocking copies)."""
            policies = [self._policies.get(int(slot), self._default_policy) for slot in slots_np]
            return tuple(t.to(device, non_blocking=True) for t in encode_policies(policies))

        def _denoise_tile_hidden(
            self, hidden, sel, sel_np, tile_slots, width, decode_slots_np, decode_idx, valid_len,
            valid_len_np, row_starts_np, all_slots, sampled, num_sampled,
        ) -> None:  # fmt: skip
            """`_denoise_tile` from hidden states: no [rows, vocab] tensor, no host sync."""
            states, device, n = self.diffusion_states, hidden.device, len(sel_np)
            if bool((np.diff(sel_np) == 1).all()) and int(valid_len_np[sel_np].min()) == width:
                first = int(row_starts_np[sel_np[0]])
                tile_hidden = hidden[first : first + n * width]
            else:  # phantom positions of a truncated canvas: zero hidden -> zero logits (vLLM zeroes them)
                positions = torch.arange(width, device=device)
                starts = async_tensor_h2d(row_starts_np[sel_np], device=device)
                src = (starts[:, None] + positions[None]).clamp_max(hidden.shape[0] - 1).reshape(-1)
                phantom = (positions[None] >= valid_len[sel][:, None]).reshape(-1, 1)
                tile_hidden = hidden[src].masked_fill_(phantom, 0)
            compute_sc = not states.single_step_slots or not states.single_step_slots.issuperset(
                decode_slots_np[sel_np].tolist()
            )
            temp = vdg._denoise_temperature(
                states.step, tile_slots, float(states.max_denoising_steps), self.t_min, self.t_max
            )
            weight, cap = self.lean_head
            hidden_denoise_step(
                tile_hidden.to(weight.dtype),
                weight,
                temp,
                torch.randint(0, 2**31 - 1, (1,), device=device)[0],
                *self._tile_policies(decode_slots_np[sel_np], device),
                self.normalizer if compute_sc else None,
                *self._tile_state(
                    tile_slots, decode_idx[sel], all_slots, valid_len[sel], width, sampled, num_sampled
                ),
                cap=cap,
                confidence_threshold=self.confidence_threshold,
                vocab_size=self.vocab_size,
                canvas_length=width,
                stability_slots=states.stability_threshold,
                chunk_size=self.chunk_size,
                backend="auto",
                update=_compiled_update(),
            )

    class Nvfp4ExtDiffusionGemmaModelState(vdg.DiffusionGemmaModelState):
        """vLLM's DiffusionGemma model state, handing the runner `Nvfp4ExtDiffusionSampler`."""

        def custom_sampler(self, sampler: Any) -> tuple[Any, Any] | None:
            builtin, rejection_sampler = super().custom_sampler(sampler)
            ours = Nvfp4ExtDiffusionSampler.from_builtin(builtin)
            ours.lean_head = lean_head(self.model, ours)
            return ours, rejection_sampler

    class Nvfp4ExtDiffusionGemma(vdg.DiffusionGemmaForConditionalGeneration):
        """vLLM's DiffusionGemma whose model state supplies the policy-aware, memory-lean sampler."""

        @staticmethod
        def get_model_state_cls() -> type:
            return Nvfp4ExtDiffusionGemmaModelState

        def compute_logits(self, hidden_states: torch.Tensor) -> Any:
            """vLLM <= 0.33's runner hands what this returns to the sampler: `DeferredLogits` instead of
            fp32 [rows, vocab] logits, except for a constrained step (the built-in path's [rows, K]).
            vLLM >= 0.34 gives the sampler the hidden states itself, so this stays vLLM's."""
            states = getattr(self, "diffusion_states", None)
            constrained = states is not None and states.step_allowed is not None
            if _RUNNER_PASSES_LOGITS and not constrained:
                project = super().compute_logits
                return DeferredLogits(hidden_states, project, self.logits_processor.org_vocab_size)
            return super().compute_logits(hidden_states)

    # vLLM >= 0.34's model state has compute_sample_logits (identity for DiffusionGemma): hidden states reach
    # the sampler. Before, the runner calls model.compute_logits and passes its result on.
    _RUNNER_PASSES_LOGITS = not hasattr(vdg.DiffusionGemmaModelState, "compute_sample_logits")
    classes = {
        cls.__name__: cls
        for cls in (Nvfp4ExtDiffusionSampler, Nvfp4ExtDiffusionGemmaModelState, Nvfp4ExtDiffusionGemma)
    }
    for cls in classes.values():  # module-level names, so the classes pickle by reference
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    return classes


_LAZY_CLASSES = ("Nvfp4ExtDiffusionGemma", "Nvfp4ExtDiffusionGemmaModelState", "Nvfp4ExtDiffusionSampler")


def __getattr__(name: str) -> Any:
    if name not in _LAZY_CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_build_classes())
    return globals()[name]
