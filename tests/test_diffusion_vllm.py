"""vLLM DiffusionGemma adapter: CPU unit tests of the sampler pieces, GPU end-to-end tests.

vLLM's DiffusionGemma needs model runner V2 (GPU Triton), so on CPU we check the parts that decide
behaviour: the batched step against vLLM's own `_compiled_sample_step` (its source, compiled here without
vLLM), per-row policy masks, the extra_args rules and the admission hook. Our sampler and model state
against vLLM's real DiffusionSampler / DiffusionGemmaModelState of every supported release (their module
needs the torchvision side folder, so in subprocesses): tests/test_vllm_versions.py.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvfp4_ext.diffusion.batched import batched_denoise_step
from nvfp4_ext.diffusion.policies import (
    ConfidencePolicy,
    EntropyBoundPolicy,
    FixedKPolicy,
    batched_accept,
    encode_policies,
)
from nvfp4_ext.engines.vllm.diffusion_gemma import request_policy, validate_policy_request
from nvfp4_ext.errors import ConfigError


def _vllm_sample_step():
    """vLLM's `_compiled_sample_step`, compiled from its source file without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    source = Path(spec.submodule_search_locations[0], "model_executor/models/diffusion_gemma.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "_compiled_sample_step":
            node.decorator_list = []
            namespace: dict = {"torch": torch}
            exec(compile(ast.Module(body=[node], type_ignores=[]), "vllm_sample_step", "exec"), namespace)
            return namespace["_compiled_sample_step"]
    pytest.fail("vLLM's diffusion_gemma.py has no _compiled_sample_step")


def _state(
    gen: torch.Generator, reqs: int = 6, cl: int = 8, vocab: int = 50, hidden: int = 4, st: int = 2
) -> dict:
    def ri(high: int, *shape: int, dtype=torch.int64) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=gen).to(dtype)

    return {
        "canvas": ri(vocab, reqs, cl),
        "argmax_canvas": ri(vocab, reqs, cl),
        "step": ri(4, reqs, dtype=torch.int32),
        "is_encoder_phase": ri(2, reqs).bool(),
        "confident": torch.zeros(reqs, dtype=torch.bool),
        "sc_embeds": torch.zeros(reqs, cl, hidden),
        "history": ri(2, reqs, st, cl),
        "history_len": ri(4, reqs, dtype=torch.int32),
        "max_steps": torch.tensor([4, 1, 4, 4, 4, 3], dtype=torch.int32),
        "pin_mask": torch.rand(reqs, cl, generator=gen) < 0.1,
        "seed_canvas": ri(vocab, reqs, cl),
        "read_only": torch.tensor([False, False, True, False, False, False]),
        "sampled": torch.zeros(5, cl, dtype=torch.int32),
        "num_sampled": torch.zeros(5, dtype=torch.int32),
        "draft_tokens": torch.zeros(reqs, cl + 2, dtype=torch.int64),
    }


@pytest.mark.parametrize("compute_sc", [True, False])
def test_batched_step_equals_vllm_builtin_step(compute_sc: bool) -> None:
    vllm_step = _vllm_sample_step()
    gen = torch.Generator().manual_seed(0)
    cl, vocab, bound, threshold = 8, 50, 0.3, 0.05
    theirs = _state(gen)
    ours = {k: v.clone() for k, v in theirs.items()}
    embed, normalizer = torch.randn(vocab, 4, generator=gen), torch.tensor(2.0)
    decode_slots, decode_idx = torch.tensor([4, 0, 2, 5]), torch.tensor([0, 1, 3, 4])
    all_slots, valid = torch.tensor([4, 0, 1, 2, 5]), torch.tensor([8, 8, 6, 8])
    for iteration in range(6):
        new_tokens = torch.randint(0, vocab, (4, cl), generator=gen)
        argmax_tokens = torch.randint(0, 2, (4, cl), generator=gen)
        if iteration >= 2:  # make some slots stable and confident so they converge and commit
            argmax_tokens[1] = theirs["history"][0, 0]
        entropy = torch.rand(4, cl, generator=gen) * torch.tensor([[1.0], [0.01], [0.5], [0.02]])
        probs = torch.randn(4, cl, vocab, generator=gen).softmax(-1)
        torch.manual_seed(100 + iteration)
        vllm_step(
            new_tokens,
            argmax_tokens,
            entropy,
            probs if compute_sc else None,
            decode_slots,
            decode_idx,
            all_slots,
            valid,
            theirs["canvas"],
            theirs["argmax_canvas"],
            theirs["step"],
            theirs["is_encoder_phase"],
            theirs["confident"],
            theirs["sc_embeds"],
            embed,
            normalizer,
            theirs["history"],
            theirs["history_len"],
            theirs["max_steps"],
            theirs["pin_mask"],
            theirs["seed_canvas"],
            theirs["read_only"],
            theirs["sampled"],
            theirs["num_sampled"],
            theirs["draft_tokens"],
            confidence_threshold=threshold,
            vocab_size=vocab,
            CL=cl,
            ST=2,
            entropy_bound=bound,
            sc_vocab_start=0,
            sc_vocab_end=vocab,
            tp_size=1,
            tp_group_name="",
            compute_sc=compute_sc,
        )
        soft = torch.matmul(probs.to(embed.dtype), embed) * normalizer if compute_sc else None
        torch.manual_seed(100 + iteration)
        batched_denoise_step(
            new_tokens,
            argmax_tokens,
            entropy,
            EntropyBoundPolicy(bound).accept(entropy, entropy),
            soft,
            decode_slots,
            decode_idx,
            all_slots,
            valid,
            ours["canvas"],
            ours["argmax_canvas"],
            ours["step"],
            ours["is_encoder_phase"],
            ours["confident"],
            ours["sc_embeds"],
            ours["history"],
            ours["history_len"],
            ours["max_steps"],
            ours["pin_mask"],
            ours["seed_canvas"],
            ours["read_only"],
            ours["sampled"],
            ours["num_sampled"],
            ours["draft_tokens"],
            confidence_threshold=threshold,
            vocab_size=vocab,
            canvas_length=cl,
            stability_slots=2,
        )
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), f"{name} differs at iteration {iteration}"
    assert int(theirs["num_sampled"].sum()) > 0  # some slots committed and emitted along the way


def test_batched_accept_picks_each_rows_policy() -> None:
    gen = torch.Generator().manual_seed(1)
    entropy, top_prob = torch.rand(4, 10, generator=gen), torch.rand(4, 10, generator=gen)
    policies = [FixedKPolicy(2), EntropyBoundPolicy(0.5), FixedKPolicy(2), ConfidencePolicy(0.6)]
    mask = batched_accept(*encode_policies(policies), entropy, top_prob)
    for row, policy in enumerate(policies):
        assert torch.equal(mask[row], policy.accept(entropy[row : row + 1], top_prob[row : row + 1])[0])
    assert mask[0].sum() == 2 and bool((mask.sum(-1) >= 1).all())


def test_request_policy_defaults_and_errors() -> None:
    assert request_policy(None, 0.1) == EntropyBoundPolicy(0.1)
    assert request_policy({"diffusion_max_steps": 3}, 0.25) == EntropyBoundPolicy(0.25)
    assert request_policy(
        {"diffusion_policy": "confidence", "diffusion_policy_threshold": 0.8}
    ) == ConfidencePolicy(0.8)
    assert request_policy({"diffusion_policy_bound": 0.4}, 0.1) == EntropyBoundPolicy(0.4)
    for extra, key in [
        ({"diffusion_policy": "fixed_k", "diffusion_policy_k": "3"}, "diffusion_policy_k"),
        ({"diffusion_policy": 7}, "diffusion_policy"),
        ({"diffusion_policy": "confidence", "diffusion_policy_k": 2}, "diffusion_policy_k"),
    ]:
        with pytest.raises(ConfigError, match=f"^{key}:"):
            request_policy(extra)
    validate_policy_request({"diffusion_policy": "fixed_k"}, wants_logprobs=False)
    validate_policy_request({"diffusion_policy": "entropy_bound"}, wants_logprobs=True)
    with pytest.raises(ConfigError, match="^diffusion_policy: .*logprobs"):
        validate_policy_request({"diffusion_policy": "fixed_k"}, wants_logprobs=True)


def test_module_import_does_not_import_vllm() -> None:
    code = (
        "import sys, nvfp4_ext.engines.vllm.diffusion_gemma as m; "
        "assert not [k for k in sys.modules if k.startswith('vllm')], 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.vllm
def test_admission_hook_turns_bad_policy_args_into_validation_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.v1.engine.input_processor as input_processor
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from nvfp4_ext.engines.vllm.diffusion_gemma import install_admission_validation

    monkeypatch.setattr(
        input_processor,
        "validate_diffusion_sampling_params",
        input_processor.validate_diffusion_sampling_params,
    )
    install_admission_validation()
    install_admission_validation()  # idempotent
    validate = input_processor.validate_diffusion_sampling_params
    validate(
        SamplingParams(extra_args={"diffusion_policy": "fixed_k", "diffusion_policy_k": 4}),
        canvas_length=16,
        vocab_size=4096,
    )
    with pytest.raises(VLLMValidationError) as info:
        validate(
            SamplingParams(extra_args={"diffusion_policy": "fixed_k", "diffusion_policy_k": 0}),
            canvas_length=16,
            vocab_size=4096,
        )
    assert info.value.parameter == "diffusion_policy_k" and "diffusion_policy_k" in str(info.value)
    with pytest.raises(VLLMValidationError, match="diffusion_max_steps"):  # vLLM's own checks still run
        validate(SamplingParams(extra_args={"diffusion_max_steps": 0}), canvas_length=16, vocab_size=4096)


def test_tensor_parallel_soft_embedding_shards_sum_to_the_full_one() -> None:
    from nvfp4_ext.diffusion.stats import logits_denoise_stats
    from nvfp4_ext.engines.vllm.diffusion_gemma import _local_soft_embedding

    gen = torch.Generator().manual_seed(3)
    logits, embed = torch.randn(6, 100, generator=gen) * 4, torch.randn(100, 8, generator=gen)
    temps = torch.rand(6, generator=gen) + 0.4
    full = logits_denoise_stats(logits, temps, seed=0, embed_weight=embed, embed_scale=1.0, chunk_size=16)
    shards = [
        _local_soft_embedding(logits, temps, full.argmax, full.top_prob, embed[lo:hi], lo, hi, 16)
        for lo, hi in ((0, 50), (50, 100))
    ]
    torch.testing.assert_close(shards[0] + shards[1], full.soft_embedding, rtol=1e-5, atol=1e-5)


@pytest.mark.vllm
def test_register_installs_the_policy_admission_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point itself wires the hook, so a served model rejects bad policy args with HTTP 400."""
    import vllm.utils.diffusion as vllm_diffusion
    import vllm.v1.engine.input_processor as input_processor

    import nvfp4_ext.engines.vllm as plugin

    unwrapped = vllm_diffusion.validate_diffusion_sampling_params
    monkeypatch.setattr(input_processor, "validate_diffusion_sampling_params", unwrapped)
    monkeypatch.setattr(plugin, "_REGISTERED", False)
    plugin.register()
    hook = input_processor.validate_diffusion_sampling_params
    assert hook is not unwrapped and getattr(hook, "_nvfp4_ext_policy_validation", False)


def test_one_step_seeded_canvas_extra_args_are_valid_requests() -> None:
    """The extra_args of tests/test_diffusion_vllm_gpu.py's one-step comparison pass vLLM's own diffusion
    request validation and ours, and vLLM refuses a canvas of the wrong length (so the test's canvas length
    is the served one)."""
    pytest.importorskip("vllm")
    from test_diffusion_vllm_gpu import CANVAS, ONE_STEP_POLICIES, VOCAB, one_step_xargs
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.utils.diffusion import validate_diffusion_sampling_params

    canvas = list(range(100, 100 + CANVAS))
    for policy in ONE_STEP_POLICIES.values():
        params = SamplingParams(max_tokens=CANVAS, ignore_eos=True, extra_args=one_step_xargs(policy, canvas))
        validate_diffusion_sampling_params(params, canvas_length=CANVAS, vocab_size=VOCAB)
        validate_policy_request(params.extra_args)
    short = SamplingParams(max_tokens=CANVAS, extra_args=one_step_xargs({}, canvas[:-1]))
    with pytest.raises(VLLMValidationError, match="diffusion_seed_canvas"):
        validate_diffusion_sampling_params(short, canvas_length=CANVAS, vocab_size=VOCAB)
