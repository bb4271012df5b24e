"""SGLang `Gemma4Renoise` of nvfp4_ext on CPU: its accept / renoise decisions equal the engine-agnostic
denoise policies on synthetic logits, the default policy reproduces SGLang's own algorithm exactly, and
per-request / YAML policy selection and the quantization veto behave.

Runs only inside the SGLang subprocess started by tests/test_sglang_isolated.py.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("NVFP4_EXT_SGLANG_CHILD") != "1":
    pytest.skip("runs in the SGLang subprocess of test_sglang_isolated.py", allow_module_level=True)

from nvfp4_ext.engines.sglang.cpu_support import prepare_cpu_import  # noqa: E402

prepare_cpu_import()
pytest.importorskip("sglang")

from sglang.srt.dllm.algorithm import gemma4_renoise as upstream  # noqa: E402
from sglang.srt.dllm.config import DllmConfig  # noqa: E402

from nvfp4_ext.diffusion.policies import get_policy  # noqa: E402
from nvfp4_ext.engines.sglang import dllm  # noqa: E402
from nvfp4_ext.engines.sglang.dllm import Gemma4Renoise  # noqa: E402

pytestmark = pytest.mark.sglang

VOCAB, HIDDEN, BLOCK, BATCH = 64, 8, 12, 3


def _algorithm(cls=Gemma4Renoise, **algorithm_config):
    config = DllmConfig(
        algorithm="Gemma4Renoise",
        algorithm_config={"seed": 1234, **algorithm_config},
        block_size=BLOCK,
        mask_id=-1,
        max_running_requests=BATCH,
        first_done_first_out_mode=True,
        requires_separate_context_encoding=True,
        capture_input_preparation=False,
    )
    algo = cls(config)
    torch.manual_seed(0)
    embed = torch.nn.Embedding(VOCAB, HIDDEN)
    embed.embed_scale = HIDDEN**0.5
    algo.vocab_size, algo.embed_tokens = VOCAB, embed
    return algo


def _batch(rids=("r0", "r1", "r2")) -> SimpleNamespace:
    return SimpleNamespace(
        batch_size=len(rids), input_ids=torch.zeros(len(rids) * BLOCK, dtype=torch.long), rids=list(rids)
    )


def _logits(seed: int) -> torch.Tensor:
    """Positions from near one-hot to near uniform, so every policy accepts some and renoises others."""
    g = torch.Generator().manual_seed(seed)
    sharpness = torch.logspace(-1, 1.5, BATCH * BLOCK)[torch.randperm(BATCH * BLOCK, generator=g)]
    return torch.randn(BATCH * BLOCK, VOCAB, generator=g) * sharpness[:, None] * 4


def _expected(
    algo, logits: torch.Tensor, states: list, policies: list
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The canvas each request must hold after one step, and the accepted masks: the policy's accepted
    positions keep a token sampled from the tempered distribution, the others get fresh uniform noise
    (replaying the request's generator)."""
    out, masks = [], []
    for index, state in enumerate(states):
        rows = logits.view(len(states), BLOCK, VOCAB)[index].float()
        steps = state["step"]
        temperature = algo.t_min + (algo.t_max - algo.t_min) * steps / algo.max_denoising_steps
        log_probs = torch.log_softmax(rows / temperature, dim=-1, dtype=torch.float32)
        probs = log_probs.exp()
        entropy = -(log_probs * probs).sum(-1)
        accepted = policies[index].accept(entropy[None], probs.amax(-1)[None])[0]
        masks.append(accepted)
        replay = torch.Generator().manual_seed(0)
        replay.set_state(state["generator"].get_state())
        noise = torch.empty_like(probs).exponential_(1.0, generator=replay)
        sampled = (probs / noise).argmax(-1)
        renoise = torch.randint(VOCAB, (BLOCK,), generator=replay)
        out.append(torch.where(accepted, sampled, renoise))
    return out, torch.stack(masks)


@pytest.mark.parametrize(
    "yaml_sampler, policy",
    [
        ({}, get_policy("entropy_bound", bound=0.1)),  # SGLang's default
        ({"entropy_bound": 0.5}, get_policy("entropy_bound", bound=0.5)),
        ({"policy": "confidence", "threshold": 0.6}, get_policy("confidence", threshold=0.6)),
        ({"policy": "fixed_k", "k": 3}, get_policy("fixed_k", k=3)),
    ],
    ids=["entropy_bound-default", "entropy_bound-0.5", "confidence-0.6", "fixed_k-3"],
)
def test_step_decisions_match_policy(yaml_sampler: dict, policy) -> None:
    algo = _algorithm(sampler_config=yaml_sampler)
    assert algo.policy == policy
    batch = _batch()
    states = algo.init_step_state(batch)
    logits = _logits(seed=7)
    expected, accepted = _expected(algo, logits, states, [policy] * BATCH)
    assert accepted.any() and not accepted.all()  # the logits exercise both decisions
    algo.step(batch, logits, states)
    for index, state in enumerate(states):
        assert torch.equal(state["current"], expected[index])
    assert torch.equal(batch.input_ids.view(BATCH, BLOCK), torch.stack([s["current"] for s in states]))


def test_default_policy_reproduces_sglang_algorithm() -> None:
    """Several steps of ours and SGLang's Gemma4Renoise from identical states: identical canvases,
    self-conditioning signals and finish decisions."""
    ours, theirs = _algorithm(), _algorithm(upstream.Gemma4Renoise)
    batch_ours, batch_theirs = _batch(), _batch()
    states_ours = ours.init_step_state(batch_ours)
    states_theirs = theirs.init_step_state(batch_theirs)
    for step in range(4):
        logits = _logits(seed=100 + step)
        if step >= 2:  # confident and, from the second such step on, stable: every canvas finishes
            logits = torch.nn.functional.one_hot(torch.arange(BATCH * BLOCK) % VOCAB, VOCAB).float() * 80
        done_ours = ours.step(batch_ours, logits.clone(), states_ours)
        done_theirs = theirs.step(batch_theirs, logits.clone(), states_theirs)
        assert done_ours == done_theirs
        for a, b in zip(states_ours, states_theirs, strict=True):
            assert torch.equal(a["current"], b["current"])
            assert a["step"] == b["step"] and a["finished"] == b["finished"]
            if a["self_conditioning"] is None:
                assert b["self_conditioning"] is None
            else:
                torch.testing.assert_close(a["self_conditioning"], b["self_conditioning"])
        assert torch.equal(batch_ours.input_ids, batch_theirs.input_ids)
    assert done_ours == [True] * BATCH


def _request(rid: str, **custom) -> SimpleNamespace:
    sampling = SimpleNamespace(
        frequency_penalty=0.0,
        presence_penalty=0.0,
        repetition_penalty=1.0,
        min_new_tokens=0,
        min_p=0.0,
        sampling_seed=None,
        logit_bias=None,
        json_schema=None,
        regex=None,
        ebnf=None,
        structural_tag=None,
        custom_params=custom or None,
    )
    return SimpleNamespace(
        rid=rid,
        sampling_params=sampling,
        return_logprob=False,
        logprob=SimpleNamespace(top_logprobs_num=0, token_ids_logprob=None),
        return_flat_raw_top_logprobs=False,
        custom_logit_processor=None,
        return_sampling_mask=False,
    )


def test_per_request_policies_in_one_batch() -> None:
    algo = _algorithm()
    requests = [
        _request("a"),
        _request("b", diffusion_policy="fixed_k", diffusion_policy_k=2),
        _request("c", diffusion_policy="confidence", diffusion_policy_threshold=0.7),
    ]
    for req in requests:
        assert Gemma4Renoise.validate_request(req) is None
    batch = _batch(rids=("a", "b", "c"))
    states = algo.init_step_state(batch)
    policies = [algo.policy, get_policy("fixed_k", k=2), get_policy("confidence", threshold=0.7)]
    assert [s["policy"] for s in states] == policies
    logits = _logits(seed=11)
    expected, _ = _expected(algo, logits, states, policies)
    algo.step(batch, logits, states)
    for index, state in enumerate(states):
        assert torch.equal(state["current"], expected[index])
    assert not dllm._PENDING  # picked up by the first step


@pytest.mark.parametrize(
    "custom, field",
    [
        ({"diffusion_policy": "top_p"}, "custom_params.diffusion_policy"),
        ({"diffusion_policy": "fixed_k", "diffusion_policy_k": 0}, "custom_params.diffusion_policy_k"),
        (
            {"diffusion_policy": "confidence", "diffusion_policy_bound": 0.1},
            "custom_params.diffusion_policy_bound",
        ),
    ],
)
def test_bad_request_policy_is_rejected(custom: dict, field: str) -> None:
    error = Gemma4Renoise.validate_request(_request("bad", **custom))
    assert error is not None and error.startswith(field)


def test_upstream_request_checks_still_apply() -> None:
    req = _request("p")
    req.sampling_params.frequency_penalty = 0.5
    assert "frequency_penalty" in Gemma4Renoise.validate_request(req)


@pytest.mark.parametrize(
    "sampler, message",
    [({"policy": "nope"}, "sampler_config.policy"), ({"policy": "fixed_k", "k": -1}, "sampler_config.k")],
)
def test_bad_yaml_policy_names_the_field(sampler: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _algorithm(sampler_config=sampler)


def test_upstream_defaults_kept() -> None:
    algo = _algorithm()
    assert (algo.max_denoising_steps, algo.t_min, algo.t_max) == (48, 0.4, 0.8)
    assert (algo.confidence_threshold, algo.stability_threshold) == (0.005, 1)
    assert algo.policy == get_policy("entropy_bound", bound=0.1)


@pytest.mark.parametrize(
    "quantization, allowed", [(None, True), ("nvfp4_ext", True), ("modelopt_fp4", False)]
)
def test_quantization_veto_lifted_only_for_nvfp4_ext(
    monkeypatch: pytest.MonkeyPatch, quantization, allowed
) -> None:
    model_config = SimpleNamespace(quantization=quantization)
    seen = []
    monkeypatch.setattr(dllm, "model_config_of", lambda server_args: model_config)
    monkeypatch.setattr(
        upstream.Gemma4Renoise,
        "configure_server_args",
        classmethod(lambda cls, server_args: seen.append(model_config.quantization)),
    )
    if allowed:
        Gemma4Renoise.configure_server_args(object())
        assert seen == [None]  # upstream's checks ran with its quantization veto out of the way
        assert model_config.quantization == quantization  # and the choice was restored
    else:
        with pytest.raises(ValueError, match="nvfp4_ext"):
            Gemma4Renoise.configure_server_args(object())
        assert seen == []


def test_one_step_seeded_config_commits_the_argmax_of_the_seeded_first_canvas() -> None:
    """What tests/test_sglang_gpu_e2e.py's one-step server relies on: with `seed` set, every request's first
    canvas is `gpu_reference.sglang_initial_canvas(seed, ...)`, and with `max_denoising_steps: 1` the
    committed canvas is the argmax of that one step's logits (whatever the policy)."""
    from gpu_reference import sglang_initial_canvas

    for policy in ({}, {"policy": "fixed_k", "k": 2}):
        algo = _algorithm(max_denoising_steps=1, sampler_config=policy)
        batch = _batch()
        states = algo.init_step_state(batch)
        for state in states:
            assert state["current"].tolist() == sglang_initial_canvas(1234, VOCAB, BLOCK, "cpu")
        logits = _logits(seed=3)
        assert algo.step(batch, logits.clone(), states) == [True] * BATCH
        argmax = logits.view(BATCH, BLOCK, VOCAB).argmax(-1)
        assert torch.equal(torch.stack([s["current"] for s in states]), argmax)
