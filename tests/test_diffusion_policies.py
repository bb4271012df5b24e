"""Denoise policies, settings, temperature schedule and stopping rule vs transformers' reference classes."""

from __future__ import annotations

import pytest
import torch

from nvfp4_ext.diffusion.policies import (
    ConfidencePolicy,
    EntropyBoundPolicy,
    FixedKPolicy,
    get_policy,
    policy_from_mapping,
)
from nvfp4_ext.diffusion.schedule import DenoiseSettings, StabilityTracker, temperature
from nvfp4_ext.errors import ConfigError

hf_gen = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")


def _random_stats(
    seed: int, batch: int = 3, length: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, 50, generator=gen) * torch.rand(batch, length, 1, generator=gen) * 12
    probs = logits.softmax(-1)
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    return logits, entropy, probs.max(-1).values


@pytest.mark.parametrize("bound", [0.01, 0.1, 1.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_bound_matches_hf_sampler(bound: float, seed: int) -> None:
    logits, entropy, top_prob = _random_stats(seed)
    sampler = hf_gen.EntropyBoundSampler(hf_gen.EntropyBoundSamplerConfig(entropy_bound=bound), 16, 50, 48)
    current, denoised = torch.zeros(3, 16, dtype=torch.long), torch.ones(3, 16, dtype=torch.long)
    sampler.accept_canvas(current, denoised, logits, cur_step=1)
    mask = EntropyBoundPolicy(bound=bound).accept(entropy, top_prob)
    assert torch.equal(mask, sampler.accepted_token_mask)
    assert bool((mask.sum(-1) >= 1).all())
    # the accepted set is a lowest-entropy prefix whose sum minus its max is within the bound
    for row in range(3):
        acc, rej = entropy[row][mask[row]], entropy[row][~mask[row]]
        assert float(acc.sum() - acc.max()) <= bound + 1e-6
        if rej.numel():
            assert float(acc.max()) <= float(rej.min())


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.9, 1.0])
def test_confidence_policy_invariants(threshold: float) -> None:
    _, entropy, top_prob = _random_stats(3, batch=4)
    mask = ConfidencePolicy(threshold=threshold).accept(entropy, top_prob)
    expected = top_prob >= threshold
    expected[torch.arange(4), top_prob.argmax(-1)] = True
    assert torch.equal(mask, expected)
    assert bool((mask.sum(-1) >= 1).all())
    if threshold == 1.0:  # no softmax reaches 1 here, so only the single most confident position
        assert mask.sum(-1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("k", [1, 3, 16, 40])
def test_fixed_k_policy_invariants(k: int) -> None:
    _, entropy, top_prob = _random_stats(4)
    mask = FixedKPolicy(k=k).accept(entropy, top_prob)
    assert mask.sum(-1).tolist() == [min(k, 16)] * 3
    for row in range(3):
        rejected = entropy[row][~mask[row]]
        if rejected.numel():
            assert float(entropy[row][mask[row]].max()) <= float(rejected.min())


def test_fixed_k_ties_are_deterministic() -> None:
    entropy = torch.zeros(1, 8)
    assert FixedKPolicy(k=3).accept(entropy, entropy).nonzero()[:, 1].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("entropy_bound", {"bound": 0.0}, "bound"),
        ("entropy_bound", {"bound": float("nan")}, "bound"),
        ("entropy_bound", {"bound": "0.1"}, "bound"),
        ("confidence", {"threshold": 1.5}, "threshold"),
        ("confidence", {"threshold": 0}, "threshold"),
        ("fixed_k", {"k": 0}, "k"),
        ("fixed_k", {"k": 2.5}, "k"),
        ("fixed_k", {"k": True}, "k"),
        ("fixed_k", {"bound": 0.1}, "bound"),
        ("greedy", {}, "policy"),
    ],
)
def test_bad_policy_parameters_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        get_policy(name, **params)


def test_policy_registry_and_round_trip() -> None:
    assert get_policy() == EntropyBoundPolicy(bound=0.1)
    for policy in (EntropyBoundPolicy(0.3), ConfidencePolicy(0.7), FixedKPolicy(5)):
        spec = policy.to_dict()
        assert get_policy(spec.pop("policy"), **spec) == policy


def test_policy_from_extra_args() -> None:
    extra = {"diffusion_policy": "fixed_k", "diffusion_policy_k": 2, "diffusion_max_steps": 4}
    assert policy_from_mapping(extra, prefix="diffusion_") == FixedKPolicy(k=2)
    # the checkpoint's bound applies to the default policy only
    assert policy_from_mapping({}, prefix="diffusion_", default_params={"bound": 0.2}) == EntropyBoundPolicy(
        0.2
    )
    with pytest.raises(ConfigError, match="^diffusion_policy_k:"):
        policy_from_mapping({"diffusion_policy": "fixed_k", "diffusion_policy_k": -1}, prefix="diffusion_")
    with pytest.raises(ConfigError, match="^diffusion_policy:"):
        policy_from_mapping({"diffusion_policy": "nope"}, prefix="diffusion_")
    with pytest.raises(ConfigError, match="^diffusion_policy_tau:"):
        policy_from_mapping(
            {"diffusion_policy": "confidence", "diffusion_policy_tau": 0.5}, prefix="diffusion_"
        )


def test_settings_validation_and_schedule_matches_hf() -> None:
    settings = DenoiseSettings()
    processor = hf_gen.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    scores = torch.ones(1, 4)
    for step in (48, 30, 1):
        assert torch.equal(scores / temperature(step, settings), processor(None, scores, cur_step=step))
    assert temperature(48, settings) == pytest.approx(0.8)
    assert torch.allclose(temperature(torch.tensor([48, 24]), settings), torch.tensor([0.8, 0.6]))
    for field, value in [
        ("max_denoising_steps", 0),
        ("t_min", -1.0),
        ("t_max", 0.1),
        ("stability_threshold", -1),
        ("confidence_threshold", 0.0),
    ]:
        with pytest.raises(ConfigError, match=rf"^{field}:"):
            DenoiseSettings(**{field: value})
    loaded = DenoiseSettings.from_generation_config(
        {"t_min": 0.5, "max_denoising_steps": 10, "other": 1},
        stability_threshold=None,
        confidence_threshold=0.1,
    )
    assert loaded == DenoiseSettings(max_denoising_steps=10, t_min=0.5, confidence_threshold=0.1)


@pytest.mark.parametrize("threshold", [0, 1, 2])
def test_stability_tracker_matches_hf(threshold: int) -> None:
    hf = hf_gen.StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=1e9)
    ours = StabilityTracker(threshold)
    gen = torch.Generator().manual_seed(0)
    canvases = [torch.randint(0, 3, (4, 2), generator=gen) for _ in range(3)]
    canvases += [canvases[-1]] * 3
    logits = torch.zeros(4, 2, 5)
    for canvas in canvases:
        assert torch.equal(ours.update(canvas), hf(canvas, logits))
