"""Model-level accuracy of a quantized checkpoint on CPU: logit KL, top-1 agreement and perplexity.

The quantized checkpoint is dequantized (`dequantize_checkpoint`, float32) and run with transformers next
to the reference, on the same tokens. Causal LMs are scored on consecutive chunks of a text; DiffusionGemma
compares the decoder logits of one denoise step on a fixed canvas (prompt = the first tokens of the text,
canvas = the following `canvas_length` tokens), which is what every denoise step computes.
"""

from __future__ import annotations

import math
import random
import tempfile
from importlib import resources
from pathlib import Path

import torch

__all__ = ["default_text", "model_metrics"]


def default_text() -> str:
    """The small English text the package ships for perplexity."""
    return resources.files("nvfp4_ext").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def _load(model_dir: Path) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def _token_ids(model_dir: Path, text: str | None, vocab_size: int, max_tokens: int) -> tuple[list[int], str]:
    """Token ids of the text; word-level test tokenizers (`w{i}` vocabularies) get a generated `w{i}` text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = "--text" if text is not None else "packaged eval_text.txt"
    text = default_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if unk is not None and ids and sum(i == unk for i in ids) > len(ids) // 2:
        rng = random.Random(0)
        words = " ".join(f"w{rng.randrange(4, min(vocab_size, 4096))}" for _ in range(max_tokens))
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        source = "generated w{i} text (word-level tokenizer)"
    return ids[:max_tokens], source


def _compare(ref_logits: torch.Tensor, quant_logits: torch.Tensor) -> tuple[float, float, int]:
    """(sum of KL(ref || quant) over positions, top-1 agreements, positions) for [T, V] logits."""
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    quant_logp = torch.log_softmax(quant_logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - quant_logp)).sum(-1)
    agree = (ref_logits.argmax(-1) == quant_logits.argmax(-1)).sum()
    return float(kl.sum()), float(agree), ref_logits.shape[0]


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


def _causal(ref: torch.nn.Module, quant: torch.nn.Module, ids: list[int], seq_len: int) -> dict:
    kl = agree = count = nll_ref = nll_quant = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            chunk = torch.tensor([ids[start : start + seq_len + 1]])
            if chunk.shape[1] < 2:
                break
            inputs, targets = chunk[:, :-1], chunk[0, 1:]
            ref_logits, quant_logits = ref(input_ids=inputs).logits[0], quant(input_ids=inputs).logits[0]
            k, a, n = _compare(ref_logits, quant_logits)
            kl, agree, count = kl + k, agree + a, count + n
            nll_ref += _nll(ref_logits, targets)
            nll_quant += _nll(quant_logits, targets)
    return {
        "mode": "causal LM over the text",
        "tokens": int(count),
        "kl_mean": kl / count,
        "top1_agreement": agree / count,
        "perplexity_reference": math.exp(nll_ref / count),
        "perplexity_quantized": math.exp(nll_quant / count),
    }


def _diffusion(ref: torch.nn.Module, quant: torch.nn.Module, ids: list[int], canvas: int) -> dict:
    prompt_len = max(1, min(len(ids) - canvas, 2 * canvas))
    prompt = torch.tensor([ids[:prompt_len]])
    target = torch.tensor([ids[prompt_len : prompt_len + canvas]])
    target = torch.nn.functional.pad(target, (0, canvas - target.shape[1]), value=0)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.where(torch.rand(target.shape, generator=generator) < 0.5, target, 0)
    with torch.no_grad():
        ref_logits = ref(input_ids=prompt, decoder_input_ids=noisy).logits[0]
        quant_logits = quant(input_ids=prompt, decoder_input_ids=noisy).logits[0]
    kl, agree, count = _compare(ref_logits, quant_logits)
    return {
        "mode": f"one denoise step: prompt {prompt_len} tokens, canvas {canvas} (half of it masked with pad)",
        "tokens": count,
        "kl_mean": kl / count,
        "top1_agreement": agree / count,
        "perplexity_reference": None,
        "perplexity_quantized": None,
    }


def model_metrics(
    reference_dir: str | Path,
    quantized_dir: str | Path,
    *,
    text: str | None = None,
    max_tokens: int = 1024,
    seq_len: int = 256,
) -> dict:
    """Compare the reference and the dequantized quantized model on CPU.

    Returns:
        {"mode", "tokens", "kl_mean", "top1_agreement", "perplexity_reference", "perplexity_quantized",
        "text"}; or {"skipped": reason} when transformers cannot build or run the model here.
    """
    from nvfp4_ext.quantize.dequantize import dequantize_checkpoint

    reference_dir = Path(reference_dir)
    try:
        ref = _load(reference_dir)
    except (OSError, ValueError, ImportError, KeyError, AttributeError, RuntimeError) as exc:
        return {"skipped": f"transformers cannot load the reference on CPU ({type(exc).__name__}: {exc})"}
    if ref.get_output_embeddings() is None:
        # encoders such as BertModel return hidden states, not token logits
        return {
            "skipped": f"{type(ref).__name__} has no language-model head (no token logits), so KL, top-1 "
            "agreement and perplexity do not apply; the weight metrics above are the report"
        }
    with tempfile.TemporaryDirectory(prefix="nvfp4_eval_") as tmp:
        dequantized = dequantize_checkpoint(quantized_dir, Path(tmp) / "dequantized")
        quant = _load(dequantized)
    config = getattr(ref.config, "text_config", ref.config)
    ids, source = _token_ids(reference_dir, text, getattr(config, "vocab_size", 0) or 0, max_tokens)
    if len(ids) < 4:
        return {"skipped": "the text is shorter than 4 tokens"}
    canvas = getattr(ref.config, "canvas_length", None)
    try:
        result = _diffusion(ref, quant, ids, canvas) if canvas else _causal(ref, quant, ids, seq_len)
    except (AttributeError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        return {
            "skipped": f"{type(ref).__name__} does not run as a language model here "
            f"({type(exc).__name__}: {exc})"
        }
    result["text"] = source
    return result
