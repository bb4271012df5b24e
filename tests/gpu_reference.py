"""References for the GPU end-to-end tests: transformers' greedy tokens on a dequantized checkpoint, with the
top-1 / top-2 logit margin at every step, so a bf16 engine can be compared with a float32 reference.

Holds no tests. A served token may differ from the reference only where the reference itself is a near tie
(margin below `NEAR_TIE`): bf16 rounding can legitimately pick the other token there, and everything after
that point is a different continuation, so the comparison stops.
"""

from __future__ import annotations

from pathlib import Path

import torch

# bf16 logits of these tiny models (|logit| ~ 1) carry ~1e-2 absolute rounding error (unmeasured on a GPU).
NEAR_TIE = 0.05


def reference_greedy(
    model_dir: Path, prompt_ids: list[list[int]], max_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """float32 transformers greedy continuation (EOS does not stop it) and the top-2 margin per step."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    outs = []
    for prompt in prompt_ids:
        ids = torch.tensor([prompt], device=device)
        tokens, margins = [], []
        with torch.no_grad():
            for _ in range(max_tokens):
                top2 = model(ids).logits[0, -1].float().topk(2)
                tokens.append(int(top2.indices[0]))
                margins.append(float(top2.values[0] - top2.values[1]))
                ids = torch.cat([ids, top2.indices[:1].reshape(1, 1)], dim=1)
        outs.append((tokens, margins))
    del model
    return outs


def assert_greedy_matches(served: list[int], reference: tuple[list[int], list[float]]) -> None:
    """Served greedy tokens == the reference's, up to the first step where the reference is a near tie."""
    tokens, margins = reference
    assert len(served) == len(tokens), (served, tokens)
    for step, (got, want) in enumerate(zip(served, tokens, strict=True)):
        if got != want:
            assert margins[step] < NEAR_TIE, (
                f"step {step}: served token {got}, reference {want} with a clear top-2 margin "
                f"{margins[step]:.3f} >= {NEAR_TIE}; served {served}, reference {tokens}"
            )
            return
