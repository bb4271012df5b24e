"""`Gemma4Renoise` for SGLang with nvfp4_ext: SGLang's DiffusionGemma renoising loop, with the accepted
positions of each step chosen by nvfp4_ext's denoise policies and quantized checkpoints allowed.

SGLang forces the algorithm name "Gemma4Renoise" for DiffusionGemma, so the plugin registers this class
under that name. Differences from upstream (everything else -- temperature schedule, exponential-race
sampling, stopping rule, self-conditioning, defaults -- is upstream's, mostly by inheritance):

* `configure_server_args` allows `--quantization nvfp4_ext` (upstream refuses every quantization);
* the accept mask comes from a `nvfp4_ext.diffusion.DenoisePolicy`: the server default from
  `--dllm-algorithm-config` (`sampler_config.policy`, default entropy_bound with upstream's
  `sampler_config.entropy_bound` 0.1), overridable per request with sampling-params `custom_params`
  `{"diffusion_policy": "confidence", "diffusion_policy_threshold": 0.9}`; bad values fail the request
  with HTTP 400 naming the field.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from sglang.srt.arg_groups.model_override_base import model_config_of
from sglang.srt.dllm.algorithm import gemma4_renoise as upstream

from nvfp4_ext.diffusion.policies import DenoisePolicy, get_policy, policy_from_mapping
from nvfp4_ext.errors import ConfigError

__all__ = ["REQUEST_PREFIX", "Gemma4Renoise", "server_policy"]

REQUEST_PREFIX = "diffusion_"
# Policies of validated requests, keyed by request id, until their first denoising step picks them up.
# Bounded: a request aborted before its first step must not leak its entry forever.
_PENDING: OrderedDict[str, DenoisePolicy] = OrderedDict()
_PENDING_LIMIT = 65536


def server_policy(algorithm_config: dict[str, Any] | None) -> DenoisePolicy:
    """The server-wide policy from the `--dllm-algorithm-config` mapping.

    `sampler_config.policy` names it (default entropy_bound); its parameters sit beside it
    (`entropy_bound` for entropy_bound -- upstream's key, default 0.1 --, `threshold`, `k`).
    """
    sampler = (algorithm_config or {}).get("sampler_config") or {}
    if not isinstance(sampler, dict):
        raise ConfigError("sampler_config: must be a mapping")
    name = sampler.get("policy", "entropy_bound")
    if name == "entropy_bound":
        return get_policy(name, bound=sampler.get("entropy_bound", 0.1))
    params = {k: v for k, v in sampler.items() if k not in ("policy", "entropy_bound")}
    try:
        return get_policy(name, **params)
    except ConfigError as exc:
        raise ConfigError(f"sampler_config.{exc}") from None


def _request_params(req: Any) -> dict[str, Any]:
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    if not isinstance(params, dict):
        return {}
    return {k: v for k, v in params.items() if k.startswith(REQUEST_PREFIX)}


class Gemma4Renoise(upstream.Gemma4Renoise):
    """SGLang's Gemma4Renoise with pluggable denoise policies and NVFP4 checkpoints."""

    @classmethod
    def configure_server_args(cls, server_args: Any) -> None:
        from nvfp4_ext.engines.sglang.config import QUANT_NAME

        model_config = model_config_of(server_args)
        quantization = model_config.quantization
        if quantization is None:
            return super().configure_server_args(server_args)
        if quantization != QUANT_NAME:
            raise ValueError(
                f"DiffusionGemma loads quantized checkpoints only with --quantization {QUANT_NAME} "
                f"(got {quantization})"
            )
        # Upstream's checks and launch settings apply unchanged; only its quantization veto is lifted.
        model_config.quantization = None
        try:
            super().configure_server_args(server_args)
        finally:
            model_config.quantization = quantization

    @classmethod
    def validate_request(cls, req: Any) -> str | None:
        error = super().validate_request(req)
        if error is not None:
            return error
        params = _request_params(req)
        if not params:
            return None
        try:
            policy = policy_from_mapping(params, prefix=REQUEST_PREFIX, default="entropy_bound")
        except ConfigError as exc:
            return f"custom_params.{exc}"
        rid = getattr(req, "rid", None)
        if rid is not None:
            _PENDING[str(rid)] = policy
            while len(_PENDING) > _PENDING_LIMIT:
                _PENDING.popitem(last=False)
        return None

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        try:
            self.policy = server_policy(config.algorithm_config)
        except ConfigError as exc:
            raise ValueError(f"--dllm-algorithm-config: {exc}") from None

    # ---------------------------------------------------------------------------------------- per request
    def init_step_state(self, forward_batch: Any) -> list[Any]:
        states = super().init_step_state(forward_batch)
        rids = forward_batch.rids or []
        for index, state in enumerate(states):
            rid = str(rids[index]) if index < len(rids) else None
            state["policy"] = _PENDING.pop(rid, self.policy) if rid is not None else self.policy
        return states

    def accept_mask(self, entropy: torch.Tensor, top_prob: torch.Tensor, states: list[Any]) -> torch.Tensor:
        """[B, L] entropy and top probability of the tempered distribution -> [B, L] accepted positions,
        each row by its request's policy (rows sharing a policy are evaluated together)."""
        policies = [state.get("policy", self.policy) for state in states]
        if all(p == policies[0] for p in policies):
            return policies[0].accept(entropy, top_prob)
        mask = torch.zeros_like(entropy, dtype=torch.bool)
        for policy in dict.fromkeys(policies):
            rows = torch.tensor([i for i, p in enumerate(policies) if p == policy], device=entropy.device)
            mask[rows] = policy.accept(entropy[rows], top_prob[rows])
        return mask

    # ------------------------------------------------------------------------------------------ the step
    def _statistics(self, logits: torch.Tensor, temperatures: torch.Tensor):
        if logits.is_cuda:
            write_soft = (
                self.embed_tokens.weight.dtype == torch.bfloat16
                and getattr(self.embed_tokens, "tp_size", 1) == 1
            )
            return upstream._denoiser_statistics_cuda(logits, temperatures, write_soft=write_soft)
        return (*upstream._denoiser_statistics(logits, temperatures), None)

    def _is_stable(self, state: dict[str, Any], argmax: torch.Tensor) -> torch.Tensor:
        """The argmax canvas equals the one `stability_threshold` steps ago (updates the history)."""
        history = state["history"]
        if self.stability_threshold == 0:
            stable = torch.ones((), dtype=torch.bool, device=argmax.device)
        elif len(history) == self.stability_threshold:
            previous = history[0] if len(history) == 1 else torch.stack(history)
            stable = (previous == argmax).all()
        else:
            stable = torch.zeros((), dtype=torch.bool, device=argmax.device)
        history.append(argmax)
        if len(history) > self.stability_threshold:
            history.pop(0)
        return stable

    def step(self, forward_batch: Any, full_logits: torch.Tensor, states: list[Any]) -> list[bool]:
        """One denoising step for every request of the batch (see the module docstring for what differs
        from upstream: only the accept mask)."""
        logits = full_logits.view(forward_batch.batch_size, self.block_size, self.vocab_size)
        if all(state["finished"] for state in states):
            self._write_input_ids(forward_batch, states)
            return [True] * len(states)
        probabilities, entropy, argmax_tokens, soft_probabilities = self._statistics(
            logits, self._temperatures(logits, states)
        )
        accepted = self.accept_mask(entropy, probabilities.amax(dim=-1), states)
        confident = entropy.mean(dim=-1) < self.confidence_threshold
        active = [i for i, state in enumerate(states) if not state["finished"]]
        verdicts = []
        for index in active:
            state = states[index]
            generator = state["generator"]
            sampled = upstream._sample_denoiser(probabilities[index], generator)
            renoise = torch.randint(
                self.vocab_size, (self.block_size,), device=logits.device, generator=generator
            )
            state["current"] = torch.where(accepted[index], sampled, renoise)
            argmax = argmax_tokens[index]
            stable = self._is_stable(state, argmax)
            state["step"] -= 1
            state["argmax"] = argmax
            verdicts.append((stable & confident[index]) | (state["step"] == 0))
        # One device-to-host synchronization for the whole batch.
        for index, finished in zip(active, torch.stack(verdicts).tolist(), strict=True):
            states[index]["finished"] = finished
        done = [state["finished"] for state in states]
        soft_embeds = None
        if not all(done):
            source = soft_probabilities if soft_probabilities is not None else probabilities
            soft_embeds = self._soft_embeddings(source.reshape(-1, self.vocab_size)).view(
                len(states), self.block_size, -1
            )
        for index in active:
            state = states[index]
            if state["finished"]:
                state["current"] = state["argmax"]
                state["self_conditioning"] = None
            else:
                state["self_conditioning"] = soft_embeds[index]
        self._write_input_ids(forward_batch, states)
        return done
