"""Our memory-lean DiffusionGemma step against one vLLM release's real classes on CPU: the `lean` check of
tests/vllm_release_driver.py (run per release by tests/test_vllm_versions.py), whose stand-ins it reuses.

The model is our real `Nvfp4ExtDiffusionGemma` class (instance built without loading weights) with a tied
LM head and vLLM's own `compute_logits` (its `_softcap_logits`; the LogitsProcessor is a one-rank GEMM).
What the runner hands the sampler is what each release's runner hands it: on 0.32/0.33 the result of
`model.compute_logits(hidden)`, on 0.34 the hidden states. vLLM's built-in `DiffusionSampler` gets the
real logits (0.32/0.33) or the hidden states (0.34) and runs its own path. Checks, step after step:
  * our path runs from hidden states: our `DeferredLogits` are never materialized and the 0.34 projection
    is never called; no tensor the step creates has [rows, vocab] elements;
  * the outcome equals vLLM's on everything its random stream does not decide (vLLM draws its Gumbel noise
    and renoise with torch.rand, ours is a counter hash): emitted tokens and counts, step counters,
    encoder phase, confidence, argmax canvases and history, self-conditioning embeddings.
"""

from __future__ import annotations

import inspect
import types

import numpy as np
import torch
import vllm_release_driver as base
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

VOCAB, HIDDEN, CANVAS = base.VOCAB, base.HIDDEN, base.CANVAS


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an op returns (not in-place results)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.numel())
        return out


class _OneRankLogitsProcessor:
    """vLLM's LogitsProcessor on one rank: the lm_head GEMM, trimmed to the vocabulary."""

    org_vocab_size = VOCAB

    def __call__(self, lm_head, hidden_states: torch.Tensor) -> torch.Tensor:
        return (hidden_states @ lm_head.weight.T)[:, :VOCAB]


def _our_model(adapter, embed: torch.Tensor, inner):
    model = adapter.Nvfp4ExtDiffusionGemma.__new__(adapter.Nvfp4ExtDiffusionGemma)
    torch.nn.Module.__init__(model)
    model.model = inner
    model.lm_head = types.SimpleNamespace(weight=embed)  # tied: the embedding's own tensor
    model.logits_processor = _OneRankLogitsProcessor()
    model.final_logit_softcapping = 30.0
    return model


def check_lean(vdg) -> None:
    import nvfp4_ext.engines.vllm.diffusion_gemma as adapter
    from nvfp4_ext.engines.vllm.deferred_logits import DeferredLogits

    vdg.get_tp_group = lambda: types.SimpleNamespace(world_size=1, unique_name="tp:0")
    hands_hidden_states = "compute_logits" in inspect.signature(vdg.DiffusionSampler.__init__).parameters
    gen = torch.Generator().manual_seed(11)
    embed = torch.randn(VOCAB, HIDDEN, generator=gen) * 2
    builtin_state = base._model_state(vdg.DiffusionGemmaModelState, vdg, embed, embed)
    our_state = base._model_state(adapter.Nvfp4ExtDiffusionGemmaModelState, vdg, embed, embed)
    model = _our_model(adapter, embed, our_state.model.model)
    our_state.model = model
    builtin_state.model = types.SimpleNamespace(
        model=builtin_state.model.model,
        compute_logits=lambda hidden: vdg.DiffusionGemmaForConditionalGeneration.compute_logits(
            model, hidden
        ),
    )
    theirs, _ = builtin_state.custom_sampler(base._base_sampler())
    ours, _ = our_state.custom_sampler(base._base_sampler())
    assert ours.lean_head is not None and ours.lean_head[1] == 30.0
    ours.chunk_size = 16  # several vocabulary chunks
    projections = []
    if hands_hidden_states:
        project = ours.compute_logits
        ours.compute_logits = lambda hidden: projections.append(1) or project(hidden)

    slots, valid = np.array([2, 0, 3, 1]), np.array([8, 8, 6, 8])  # slot 3: 6 of 8 positions scheduled
    for sampler in (theirs, ours):
        for slot in range(4):
            sampler.diffusion_states.add_request(slot)
            sampler.add_request(slot, _params())
        sampler.apply_staged_writes()
        torch.manual_seed(1)
        sampler(
            torch.zeros(0, HIDDEN if hands_hidden_states else VOCAB), base._batch(slots, np.zeros(4, int))
        )
    # Peaked rows (low entropy) so requests accept, converge and commit within a few steps.
    targets = torch.randint(0, VOCAB, (int(valid.sum()),), generator=gen)
    hidden = embed[targets] * 0.4 + torch.randn(int(valid.sum()), HIDDEN, generator=gen) * 0.1
    emitted = 0
    for step in range(6):
        logits = vdg.DiffusionGemmaForConditionalGeneration.compute_logits(model, hidden)
        torch.manual_seed(100 + step)
        out_theirs = theirs(hidden.clone() if hands_hidden_states else logits, base._batch(slots, valid))
        rows = hidden.clone() if hands_hidden_states else model.compute_logits(hidden)
        assert hands_hidden_states or isinstance(rows, DeferredLogits), type(rows)
        torch.manual_seed(100 + step)
        with _LargestTensor() as largest:
            out_ours = ours(rows, base._batch(slots, valid))
        # a [rows, vocab] tensor has 4 * CANVAS * VOCAB elements; the soft embedding [rows, H] is the largest
        assert largest.largest <= 4 * CANVAS * HIDDEN < 4 * CANVAS * VOCAB, (step, largest.largest)
        assert not projections and not (isinstance(rows, DeferredLogits) and rows.materialized), step
        for field in ("num_sampled", "num_rejected", "sampled_token_ids"):
            assert torch.equal(getattr(out_ours, field), getattr(out_theirs, field)), (step, field)
        emitted += int((out_theirs.num_sampled > 0).sum())
        s_theirs, s_ours = theirs.diffusion_states, ours.diffusion_states
        for name in (
            "step", "is_encoder_phase", "confident", "accepted_canvas_history_len", "argmax_canvas",
            "accepted_canvas_history",
        ):  # fmt: skip
            assert torch.equal(getattr(s_ours, name), getattr(s_theirs, name)), (step, name)
        torch.testing.assert_close(
            s_ours.self_conditioning_embeds,
            s_theirs.self_conditioning_embeds,
            rtol=1e-5,
            atol=1e-5 * float(embed.abs().max()) * 2.0,  # |soft| <= max|E| * normalizer (2)
        )
    assert emitted >= 4, emitted  # every request converged and committed its block
    print("lean ok", "hidden states" if hands_hidden_states else "deferred logits")


def _params():
    from vllm.sampling_params import SamplingParams

    return SamplingParams()
