"""The comparison code of the GPU end-to-end tests (tests/gpu_reference.py), run on CPU so the first GPU run
cannot die on a typo or a wrong expectation: a bf16 run of the same dequantized weights (what a bf16 engine
computes) passes it, a model with a wrong weight fails it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_reference import (
    BF16_EPS,
    ULPS,
    ReferenceTokens,
    _HeadInput,
    assert_canvas_agrees,
    assert_greedy_matches,
    assert_served_greedy,
    canvas_agreement,
    load_diffusion_reference,
    near_tie_tolerance,
    reference_canvas,
    sglang_initial_canvas,
)
from test_vllm_helpers import PROMPTS, tiny_checkpoint

pytest.importorskip("transformers")

DG_PROMPTS = [[2, 10, 11, 12, 13], [2, 20, 21], [2, 5, 6, 7, 8, 9]]


def test_near_tie_tolerance_is_ulps_eps_times_the_two_logits_terms() -> None:
    hidden = torch.tensor([[1.0, -2.0]])
    head = torch.tensor([[3.0, 1.0], [-1.0, 4.0], [5.0, 5.0]])
    tolerance = near_tie_tolerance(hidden, head, torch.tensor([[0, 1]]), ulps=2)
    # |1*3| + |-2*1| = 5 and |1*-1| + |-2*4| = 9
    assert tolerance.tolist() == [pytest.approx(2 * BF16_EPS * 14)]


def test_greedy_check_allows_a_near_tie_and_fails_on_a_clear_deficit() -> None:
    reference = ReferenceTokens([5, 6, 7], margins=[0.0, 0.01, 0.0], tolerances=[0.05, 0.05, 0.05])
    assert_greedy_matches([5, 6, 7], reference)
    assert_greedy_matches([5, 9, 7], reference)  # step 1 picked a token 0.01 below the top: a near tie
    with pytest.raises(AssertionError, match="more than the bf16 tolerance"):
        assert_greedy_matches([5, 6, 7], ReferenceTokens([5, 6, 8], [0.0, 0.0, 0.2], [0.05] * 3))


def _perturbed(source: Path, out: Path, loader) -> Path:
    """The same checkpoint with every MoE layer's experts permuted and scaled by 16 (a wrong expert mapping
    and a wrong global scale; a permutation alone hardly changes the tiny Qwen3-MoE's tokens: its residual
    stream dominates)."""
    model = loader(source, dtype=torch.float32)
    changed = 0
    for name, param in model.named_parameters():
        if "experts" in name and param.dim() == 3 and param.shape[0] > 1:
            with torch.no_grad():
                param.copy_(param.roll(1, dims=0) * 16)
            changed += 1
    assert changed
    model.save_pretrained(out)
    return out


def _greedy(
    model_dir: Path, prompt_ids: list[list[int]], max_tokens: int, dtype: torch.dtype
) -> list[list[int]]:
    """What an engine serving `model_dir` in `dtype` answers (transformers' greedy generate, EOS ignored)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    for prompt in prompt_ids:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(max_tokens):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        out.append(ids[0, len(prompt) :].tolist())
    return out


@pytest.mark.parametrize("model", ["gemma4-moe", "qwen3-moe"])
def test_bf16_greedy_passes_and_a_wrong_model_fails(model: str, tmp_path_factory) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.getbasetemp() / "gpu_reference"
    dequantized = tiny_checkpoint(root, model, "dequantized")
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(root, model, "modelopt"))
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert_served_greedy(dequantized, prompt_ids, _greedy(dequantized, prompt_ids, 12, torch.bfloat16), 12)
    wrong = _perturbed(dequantized, root / model / "wrong", AutoModelForCausalLM.from_pretrained)
    served_wrong = _greedy(wrong, prompt_ids, 12, torch.bfloat16)
    with pytest.raises(AssertionError, match="more than the bf16 tolerance"):
        assert_served_greedy(dequantized, prompt_ids, served_wrong, 12)
    with pytest.raises(AssertionError):
        assert_served_greedy(dequantized, prompt_ids, [t[:-1] for t in served_wrong], 12)  # too short


@pytest.fixture(scope="module")
def diffusion_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from nvfp4_ext.quantize import dequantize_checkpoint, quantize_checkpoint
    from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma

    root = tmp_path_factory.mktemp("dg_reference")
    plain = build_tiny_diffusion_gemma(root / "bf16", dtype=torch.bfloat16)
    nvfp4 = quantize_checkpoint(plain, root / "nvfp4", recipe="w4a16", progress=False)
    dequantized = dequantize_checkpoint(nvfp4, root / "dequantized")
    from transformers import DiffusionGemmaForBlockDiffusion

    wrong = _perturbed(dequantized, root / "wrong", DiffusionGemmaForBlockDiffusion.from_pretrained)
    return {"nvfp4": nvfp4, "dequantized": dequantized, "wrong": wrong}


def _canvases(vocab: int) -> list[list[int]]:
    return [sglang_initial_canvas(seed, vocab, 16, "cpu") for seed in range(len(DG_PROMPTS))]


def test_sglang_initial_canvas_is_seeded_randint() -> None:
    a, b = sglang_initial_canvas(7, 4096, 16, "cpu"), sglang_initial_canvas(7, 4096, 16, "cpu")
    assert a == b and len(a) == 16 and all(0 <= t < 4096 for t in a) and len(set(a)) > 8
    assert a != sglang_initial_canvas(8, 4096, 16, "cpu")


def test_one_denoise_step_bf16_agrees_and_a_wrong_model_does_not(diffusion_checkpoints) -> None:
    reference_model = load_diffusion_reference(diffusion_checkpoints["dequantized"])
    vocab = reference_model.config.text_config.vocab_size
    canvases = _canvases(vocab)
    references = [reference_canvas(reference_model, p, c) for p, c in zip(DG_PROMPTS, canvases, strict=True)]
    bf16 = load_diffusion_reference(diffusion_checkpoints["dequantized"], torch.bfloat16)
    served = [reference_canvas(bf16, p, c).tokens for p, c in zip(DG_PROMPTS, canvases, strict=True)]
    assert_canvas_agrees(served, references, canvases, vocab)
    wrong_model = load_diffusion_reference(diffusion_checkpoints["wrong"], torch.bfloat16)
    wrong = [reference_canvas(wrong_model, p, c).tokens for p, c in zip(DG_PROMPTS, canvases, strict=True)]
    assert canvas_agreement(wrong, references, canvases)[0] < 0.2
    with pytest.raises(AssertionError, match="informative canvas positions"):
        assert_canvas_agrees(wrong, references, canvases, vocab)
    with pytest.raises(AssertionError):
        assert_canvas_agrees(
            [[vocab] * 16] * len(DG_PROMPTS), references, canvases, vocab
        )  # out of the vocabulary


def test_ulps_covers_bf16_rounding_where_no_router_flips(tmp_path_factory) -> None:
    """Re-measures the calibration of `ULPS`: on the tiny Qwen3-MoE (no router flip at these prompts), every
    logit of a bf16 forward is within ULPS * eps_bf16 * sum |terms| of the float32 one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.getbasetemp() / "gpu_reference"
    dequantized = tiny_checkpoint(root, "qwen3-moe", "dequantized")
    ids = [
        AutoTokenizer.from_pretrained(tiny_checkpoint(root, "qwen3-moe", "modelopt"))(p).input_ids
        for p in PROMPTS
    ]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(dequantized, dtype=dtype).eval()
        head = _HeadInput(model)
        with torch.no_grad():
            runs[dtype] = [(model(torch.tensor([p])).logits[0].double(), head.hidden[0]) for p in ids]
        head.handle.remove()
        if dtype == torch.float32:
            head_weight = head.head.weight.detach()
    for (exact, hidden), (rounded, _) in zip(runs[torch.float32], runs[torch.bfloat16], strict=True):
        terms = hidden.double().abs() @ head_weight.double().abs().T
        assert ((rounded - exact).abs() <= ULPS * BF16_EPS * terms).all()
