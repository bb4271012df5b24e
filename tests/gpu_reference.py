"""References for the GPU end-to-end tests: transformers in float32 on a dequantized checkpoint, with, per
compared token, the top-1 / top-2 logit margin and how far bf16 rounding can move that margin.

Holds no tests (tests/test_gpu_reference.py checks these helpers on CPU).

Tolerance model (as tests/tolerances.py, with bf16 in place of fp32). A logit is `l_v = sum_k h_k W_vk` over
the final hidden state h. An engine running in bf16 carries a relative error of a few bf16 units on every
term, so `|l_v(bf16) - l_v(fp32)| <= ulps * eps_bf16 * sum_k |h_k W_vk|`, and the top-2 margin `l_a - l_b`
moves by at most the sum of that bound for a and b (the final softcap, `c tanh(l / c)`, only shrinks
differences). A served token may differ from the reference only where the margin is below that bound
(`near_tie_tolerance`). `ULPS` = 4: on the tiny Gemma 4 MoE and Qwen3-MoE, transformers in bf16 vs float32
(CPU) stays within 1.34 units for every logit at every position where no MoE router flips its expert choice
(measured; `test_gpu_reference.py` re-measures it). For these models `sum |terms|` is ~0.8 per logit, so the
tolerance is ~0.05 per margin (the old fixed `NEAR_TIE`). A router flip is a discontinuity no rounding bound
covers.

Greedy tokens are checked teacher-forced (`greedy_deficits`): the reference runs on the served prefix and
every served token must be its argmax or within the tolerance of it. Stopping at the first near tie instead
would make the check vacuous here: the top-2 margins of these random tiny models are ~0.04 (median), so the
first step is often a near tie already.

DiffusionGemma: one denoise step from a known canvas is deterministic (its argmax canvas does not depend on
the engine's random stream; `reference_canvas`). The tiny random DiffusionGemma is far more sensitive to bf16
than the autoregressive models (router flips in its first layer move the final hidden state by 10-90 %), so
the served canvas is compared by agreement: at least `CANVAS_AGREEMENT` of the positions where the reference
does not just copy its input token equal the reference argmax (bf16 on CPU: 0.67 of 21; a perturbed model:
0 of 21; chance: 1 / vocab).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

BF16_EPS = torch.finfo(torch.bfloat16).eps
ULPS = 4.0
CANVAS_AGREEMENT = 0.5


@dataclass
class ReferenceTokens:
    """Reference token per position (greedy step or canvas position), its top-2 margin and the bf16 bound
    on that margin's movement (`near_tie_tolerance`)."""

    tokens: list[int]
    margins: list[float]
    tolerances: list[float]


def near_tie_tolerance(
    hidden: torch.Tensor, head_weight: torch.Tensor, top2: torch.Tensor, ulps: float = ULPS
) -> torch.Tensor:
    """[rows] bound on how far bf16 rounding moves the margin between the two tokens `top2` [rows, 2]:
    `ulps * eps_bf16 * (sum_k |h_k W_ak| + sum_k |h_k W_bk|)` in fp64 (hidden [rows, H], head [V, H])."""
    h = hidden.double().abs()
    w = head_weight.double().abs()[top2]  # [rows, 2, H]
    terms = (w * h[:, None, :]).sum(-1)  # [rows, 2]
    return ulps * BF16_EPS * terms.sum(-1)


def _top2_with_tolerance(logits: torch.Tensor, hidden: torch.Tensor, head_weight: torch.Tensor):
    top2 = logits.float().topk(2, dim=-1)
    margins = top2.values[:, 0] - top2.values[:, 1]
    return top2.indices, margins, near_tie_tolerance(hidden, head_weight, top2.indices)


class _HeadInput:
    """Captures the input of the LM head (the final hidden state) on every forward."""

    def __init__(self, model) -> None:
        self.hidden: torch.Tensor | None = None
        self.head = model.get_output_embeddings()
        self.handle = self.head.register_forward_hook(self._store)

    def _store(self, module, inputs, output) -> None:
        self.hidden = inputs[0].detach()


def greedy_deficits(
    model_dir: Path, prompt_ids: list[list[int]], served: list[list[int]], dtype: torch.dtype = torch.float32
) -> list[ReferenceTokens]:
    """Teacher-forced reference along the *served* tokens: for every step, the reference argmax given the
    served prefix, the reference's logit deficit of the served token (max logit - logit of the served
    token; 0 when it is the argmax) as `margins`, and the bf16 bound on that deficit as `tolerances`.

    Every step is checked, also after a legitimate divergence at a near tie (an engine that picked the
    runner-up continues on its own prefix, which the reference follows). `dtype` other than float32 only to
    show, on CPU, what a bf16 engine computes."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    head = _HeadInput(model)
    outs = []
    try:
        for prompt, tokens in zip(prompt_ids, served, strict=True):
            ids = torch.tensor([prompt + tokens], device=device)
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : ids.shape[1] - 1].float()
            hidden = head.hidden[0, len(prompt) - 1 : ids.shape[1] - 1]
            chosen = torch.tensor(tokens, device=device)
            best = logits.argmax(-1)
            deficits = logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0]
            tolerance = near_tie_tolerance(hidden, head.head.weight, torch.stack([best, chosen], -1))
            outs.append(ReferenceTokens(best.tolist(), deficits.tolist(), tolerance.tolist()))
    finally:
        head.handle.remove()
    del model
    return outs


def assert_greedy_matches(served: list[int], reference: ReferenceTokens) -> None:
    """Every served greedy token is the reference argmax given the served prefix, or within the bf16
    tolerance of it (a near tie; `greedy_deficits`)."""
    assert len(served) == len(reference.tokens), (served, reference.tokens)
    for step, (got, want) in enumerate(zip(served, reference.tokens, strict=True)):
        deficit, tolerance = reference.margins[step], reference.tolerances[step]
        assert got == want or deficit <= tolerance, (
            f"step {step}: served token {got}, reference argmax {want}: the served token's logit is "
            f"{deficit:.4f} below the top one, more than the bf16 tolerance {tolerance:.4f}; "
            f"served {served}, reference argmax per step {reference.tokens}"
        )


def assert_served_greedy(
    model_dir: Path, prompt_ids: list[list[int]], served: list[list[int]], max_tokens: int
) -> None:
    """The GPU tests' check: `max_tokens` tokens per prompt, each one the float32 reference's greedy choice
    up to bf16 rounding (`assert_greedy_matches` on `greedy_deficits`)."""
    assert all(len(tokens) == max_tokens for tokens in served), served
    for tokens, reference in zip(served, greedy_deficits(model_dir, prompt_ids, served), strict=True):
        assert_greedy_matches(tokens, reference)


# ------------------------------------------------------------------------------------------ DiffusionGemma
def load_diffusion_reference(model_dir: Path, dtype: torch.dtype = torch.float32):
    """transformers' DiffusionGemmaForBlockDiffusion on `model_dir` (a dequantized checkpoint)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def reference_canvas(model, prompt_ids: list[int], canvas: list[int]) -> ReferenceTokens:
    """The argmax canvas of one denoise step: the prompt encoded, the decoder run once on `canvas` with no
    self-conditioning (the first step of every engine), tokens = argmax of the softcapped logits."""
    device = next(model.parameters()).device
    head = _HeadInput(model)
    try:
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([prompt_ids], device=device),
                decoder_input_ids=torch.tensor([canvas], device=device),
            ).logits[0]
        top2, margins, tolerances = _top2_with_tolerance(logits, head.hidden[0], head.head.weight)
    finally:
        head.handle.remove()
    return ReferenceTokens(top2[:, 0].tolist(), margins.tolist(), tolerances.tolist())


def canvas_agreement(
    served: list[list[int]], references: list[ReferenceTokens], canvases: list[list[int]]
) -> tuple[float, int]:
    """(fraction, count) of the informative canvas positions, over all requests, whose served token equals
    the reference argmax. Informative: the reference argmax differs from the input canvas token there. The
    tiny models' residual stream carries the input embedding, so many positions just copy their input token,
    and any model, also a wrong one, "agrees" on those (measured: a perturbed model agreed on 18 of 48
    positions, all of them copies, and on 0 of the 21 others)."""
    pairs = [
        (got, want)
        for tokens, reference, canvas in zip(served, references, canvases, strict=True)
        for got, want, given in zip(tokens, reference.tokens, canvas, strict=True)
        if want != given
    ]
    return sum(got == want for got, want in pairs) / max(len(pairs), 1), len(pairs)


def assert_canvas_agrees(
    served: list[list[int]],
    references: list[ReferenceTokens],
    canvases: list[list[int]],
    vocab_size: int,
    minimum: float = CANVAS_AGREEMENT,
) -> None:
    """Every served canvas is complete and in the vocabulary, and at least `minimum` of the informative
    positions (`canvas_agreement`) equal the reference argmax (bf16 on CPU: 0.67; a wrong model: 0)."""
    for tokens, reference in zip(served, references, strict=True):
        assert len(tokens) == len(reference.tokens), (tokens, reference.tokens)
        assert all(0 <= t < vocab_size for t in tokens), tokens
    agreement, informative = canvas_agreement(served, references, canvases)
    assert informative >= 8, f"only {informative} positions where the reference does not copy its input"
    assert agreement >= minimum, (
        f"only {agreement:.2f} of the {informative} informative canvas positions equal the reference argmax "
        f"(need {minimum}); served {served}, reference {[r.tokens for r in references]}"
    )


def sglang_initial_canvas(seed: int, vocab_size: int, length: int, device: str | torch.device) -> list[int]:
    """The first canvas SGLang's Gemma4Renoise draws for a request when its algorithm config sets `seed`:
    `torch.randint(vocab, (block,), generator=Generator(device).manual_seed(seed))` on the engine's device."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randint(vocab_size, (length,), device=device, generator=generator).tolist()
