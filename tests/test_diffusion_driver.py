"""The reference driver on a tiny random DiffusionGemma (CPU, float32).

ACCEPTANCE: with `stats="hf-exact"` and the `entropy_bound` policy, the driver reproduces transformers' own
`generate` token for token for several seeds and prompts. Random weights never converge, so the cases cap
the steps (`max_denoising_steps`) or force one step per canvas to stay cheap.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4_ext.diffusion.driver import _finalize_canvas, default_policy, default_settings, generate
from nvfp4_ext.diffusion.policies import ConfidencePolicy, EntropyBoundPolicy, FixedKPolicy
from nvfp4_ext.diffusion.stats import categorical_entropy, fused_denoise_stats
from nvfp4_ext.errors import ConfigError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma

    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("tiny_dg"), seed=0)


@pytest.fixture(scope="module")
def model(model_dir):
    return transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir).eval()


PARITY_CASES = [
    (0, [2, 17, 42, 99, 7], {"max_denoising_steps": 4}),
    (1, [2, 5, 6], {"max_denoising_steps": 3, "t_min": 0.5, "t_max": 1.0}),
    (
        7,
        [2, 17, 42, 99, 7, 300, 512, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
        {"max_denoising_steps": 4},
    ),
    (3, [2, 9], {"stability_threshold": 0, "confidence_threshold": 1e9}),
]


@pytest.mark.parametrize(
    ("seed", "prompt", "knobs"), PARITY_CASES, ids=["s0", "s1-temps", "s7-long", "s3-1step"]
)
def test_hf_exact_driver_reproduces_transformers_generate(
    model, seed: int, prompt: list[int], knobs: dict
) -> None:
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    reference = model.generate(ids, max_new_tokens=32, **knobs)
    ours = generate(model, ids, settings=default_settings(model, **knobs), max_new_tokens=32, seed=seed)
    assert torch.equal(ours.sequences, reference.sequences)
    expected_steps = 1 if knobs.get("stability_threshold") == 0 else knobs["max_denoising_steps"]
    assert ours.steps == [[expected_steps], [expected_steps]]


def test_hf_exact_driver_batched_left_padded(model) -> None:
    ids = torch.tensor([[0, 0, 2, 11, 12], [2, 21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.manual_seed(5)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=16, max_denoising_steps=3)
    ours = generate(
        model,
        ids,
        attention_mask=mask,
        settings=default_settings(model, max_denoising_steps=3),
        max_new_tokens=16,
        seed=5,
    )
    assert torch.equal(ours.sequences, reference.sequences)


def test_default_policy_and_settings_come_from_the_checkpoint(model) -> None:
    assert default_policy(model) == EntropyBoundPolicy(bound=0.1)
    settings = default_settings(model)
    assert (settings.max_denoising_steps, settings.t_min, settings.t_max) == (48, 0.4, 0.8)


def test_finalize_canvas_matches_hf(model) -> None:
    gen_config = model.generation_config
    eos = torch.tensor([1, 106])
    base = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 1, 8, 106, 10], [5, 6, 7, 8, 9, 1]])
    finished = torch.tensor([True, False, False])
    criteria = model._prepare_ar_stopping_criteria(gen_config, None)
    expected, expected_finished = model._finalize_canvas(
        base.clone(), finished.clone(), gen_config, criteria, 4, eos
    )
    ours, ours_finished = _finalize_canvas(
        base.clone(), finished.clone(), 4, 100, eos, gen_config.pad_token_id
    )
    assert torch.equal(ours, expected) and torch.equal(ours_finished, expected_finished)


def _decoder_inputs(model, prompt: list[int]):
    config = model.config
    cache = transformers.DynamicCache(config=config.get_text_config(decoder=True))
    ids = torch.tensor([prompt])
    model.model.encoder(input_ids=ids, past_key_values=cache)
    canvas = torch.randint(
        0,
        config.text_config.vocab_size,
        (1, config.canvas_length),
        generator=torch.Generator().manual_seed(0),
    )
    return cache, canvas, torch.arange(len(prompt), len(prompt) + config.canvas_length)[None]


@torch.no_grad()
def test_fused_statistics_on_the_model_match_its_logits(model) -> None:
    cache, canvas, pos = _decoder_inputs(model, [2, 30, 31, 32])
    logits = model(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=pos).logits[0]
    hidden = model.model.decoder(
        decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=pos
    ).last_hidden_state[0]
    embed = model.model.decoder.embed_tokens
    stats = fused_denoise_stats(
        hidden, embed.weight, 0.6, seed=1, cap=30.0, embed_scale=float(embed.embed_scale), chunk_size=1000
    )
    z = logits / 0.6
    assert torch.equal(stats.argmax, z.argmax(-1))
    torch.testing.assert_close(stats.entropy, categorical_entropy(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.top_prob, z.softmax(-1).max(-1).values, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_injected_soft_embedding_equals_self_conditioning_logits(model) -> None:
    """The fused path feeds softmax(z) @ E * sqrt(H) straight into the self-conditioning block; the decoder
    must then compute what it computes from the tempered logits themselves."""
    from nvfp4_ext.diffusion.driver import _SoftEmbeddingInjector

    cache, canvas, pos = _decoder_inputs(model, [2, 40, 41])
    decoder, embed = model.model.decoder, model.model.decoder.embed_tokens
    z = torch.randn(1, canvas.shape[1], embed.weight.shape[0], generator=torch.Generator().manual_seed(2)) * 3
    with_logits = decoder(
        decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=z, decoder_position_ids=pos
    ).last_hidden_state
    soft = (z.softmax(-1) @ embed.weight) * embed.embed_scale
    injector = _SoftEmbeddingInjector(decoder.self_conditioning)
    try:
        injector.soft = soft
        injected = decoder(
            decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=pos
        ).last_hidden_state
    finally:
        injector.remove()
    torch.testing.assert_close(injected, with_logits, rtol=1e-5, atol=1e-5)
    plain = decoder(
        decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=pos
    ).last_hidden_state
    assert not torch.allclose(plain, with_logits)  # the hook is gone and self-conditioning mattered


@pytest.mark.parametrize(
    "policy",
    [EntropyBoundPolicy(0.1), ConfidencePolicy(0.5), FixedKPolicy(3)],
    ids=["entropy_bound", "confidence", "fixed_k"],
)
def test_fused_driver_policies_terminate_and_accept(model, policy) -> None:
    settings = default_settings(model, max_denoising_steps=3)
    ids = torch.tensor([[2, 17, 42]])
    first = generate(model, ids, settings=settings, policy=policy, max_new_tokens=16, stats="fused", seed=4)
    again = generate(model, ids, settings=settings, policy=policy, max_new_tokens=16, stats="fused", seed=4)
    assert torch.equal(first.sequences, again.sequences)
    assert first.new_tokens.shape == (1, 16)
    assert first.steps == [[3]]  # random weights never converge: every canvas runs to the cap
    counts = [step[0] for step in first.accepted[0]]
    assert len(counts) == 3 and all(c >= 1 for c in counts)
    if isinstance(policy, FixedKPolicy):
        assert counts == [3, 3, 3]


def test_fused_driver_stops_early_when_confident(model) -> None:
    settings = default_settings(model, stability_threshold=0, confidence_threshold=1e9)
    result = generate(
        model, torch.tensor([[2, 3]]), settings=settings, max_new_tokens=32, stats="fused", seed=0
    )
    assert result.steps == [[1], [1]]
    assert result.to_json()["steps"] == [1, 1] and len(result.to_json()["token_ids"]) == 32


def test_bad_inputs_raise_config_errors(model) -> None:
    with pytest.raises(ConfigError, match="^input_ids:"):
        generate(model, torch.tensor([[2, 999999]]), max_new_tokens=16)
    with pytest.raises(ConfigError, match="^stats:"):
        generate(model, torch.tensor([[2]]), stats="fast")
    with pytest.raises(ConfigError, match="^max_new_tokens:"):
        generate(model, torch.tensor([[2]]), max_new_tokens=0)
