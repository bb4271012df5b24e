"""Train a tiny DiffusionGemma (transformers' classes, ~1.5 M parameters) on digit sorting, on CPU.

Random weights make every denoise policy degenerate (near-uniform entropy), so comparing policies needs a
model that has learned something. Task: the prompt is `<bos> d1 .. dN <sep>` (N digits), the canvas is the
N digits sorted ascending; the canvas length is N, so one canvas is the whole answer and exact match is
checkable. Objective: uniform corruption (shared/reference/diffusiongemma.md): per example a corruption rate
r ~ U(0, 1), each canvas position replaced by a uniform random token id with probability r, the decoder run
over the corrupted canvas with the prompt's KV cache, cross-entropy against the clean canvas; with
probability 1/2 a first no-grad pass provides `self_conditioning_logits`, as at inference.

Deterministic from `--seed` for a fixed `--steps` and thread count; `--max-minutes` is only a safety cap
(stopping on time makes the result machine-dependent, which the script reports). Writes a BF16 HF
checkpoint (+ tokenizer, generation_config, task.json) to `--out`; weights are never committed.

    python benchmarks/train_tiny_diffusion_gemma.py --out artifacts/dg_sort [--steps 600 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PAD, EOS, BOS, SEP = 0, 1, 2, 3
DIGIT0 = 10  # token id of digit 0


@dataclass(frozen=True)
class SortTask:
    """Sort `num_digits` digits; the answer fills one canvas exactly."""

    num_digits: int = 8
    vocab_size: int = 32

    @property
    def prompt_length(self) -> int:
        return self.num_digits + 2

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, N + 2] prompts, [batch, N] sorted answers), token ids."""
        digits = torch.randint(0, 10, (batch, self.num_digits), generator=generator)
        prompt = torch.cat([torch.full((batch, 1), BOS), digits + DIGIT0, torch.full((batch, 1), SEP)], dim=1)
        return prompt, digits.sort(dim=1).values + DIGIT0


def build_model(task: SortTask, seed: int):
    """A DiffusionGemma sized for the task (tiny_models recipe with a task-sized vocabulary and canvas)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    hidden = 128
    text_config = dict(
        vocab_size=task.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=32,
        max_position_embeddings=256,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=hidden // 2,
        use_bidirectional_attention="vision",
        final_logit_softcapping=30.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
            },
        },
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    vision_config = dict(
        model_type="gemma4_vision",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=64,
    )
    top = task.vocab_size
    config = DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        canvas_length=task.num_digits,
        image_token_id=top - 3,
        boi_token_id=top - 2,
        eoi_token_id=top - 1,
        eos_token_id=[EOS],
    )
    config.architectures = ["DiffusionGemmaForBlockDiffusion"]
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=task.num_digits,
        max_denoising_steps=16,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=[EOS],
    )
    return model


def diffusion_loss(
    model, prompt: torch.Tensor, answer: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Uniform-corruption cross-entropy of one batch (with self-conditioning on half the steps)."""
    from transformers import DynamicCache

    batch, length = answer.shape
    vocab = model.config.text_config.vocab_size
    rate = torch.rand(batch, 1, generator=generator)
    corrupt = torch.rand(batch, length, generator=generator) < rate
    noisy = torch.where(corrupt, torch.randint(0, vocab, answer.shape, generator=generator), answer)
    use_sc = bool(torch.rand((), generator=generator) < 0.5)
    text_config = model.config.get_text_config(decoder=True)

    def forward(sc_logits):
        cache = DynamicCache(config=text_config)
        return model(
            input_ids=prompt,
            decoder_input_ids=noisy,
            self_conditioning_logits=sc_logits,
            past_key_values=cache,
        ).logits

    sc_logits = None
    if use_sc:
        with torch.no_grad():
            sc_logits = forward(None) / 0.6  # a mid-schedule temperature, as the sampler would feed back
    logits = forward(sc_logits)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), answer.reshape(-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--digits", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-minutes", type=float, default=10.0, help="safety cap (breaks determinism if hit)"
    )
    args = parser.parse_args(argv)

    from nvfp4_ext.tiny_models import write_tokenizer

    torch.set_num_threads(args.threads)
    task = SortTask(num_digits=args.digits)
    model = build_model(task, args.seed).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"DiffusionGemma sort-{task.num_digits}: {params / 1e6:.2f} M parameters, {args.steps} steps x "
        f"batch {args.batch}, {args.threads} threads"
    )
    start, losses, stopped_early = time.perf_counter(), [], False
    for step in range(args.steps):
        prompt, answer = task.sample(args.batch, generator)
        loss = diffusion_loss(model, prompt, answer, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - start
        if step % 100 == 0 or step == args.steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step:5d}  loss {recent:.4f}  {elapsed:6.0f} s")
        if elapsed > args.max_minutes * 60:
            print(
                f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached (not deterministic)"
            )
            stopped_early = True
            break
    model.eval().to(torch.bfloat16).save_pretrained(args.out)
    write_tokenizer(args.out, task.vocab_size)
    summary = {
        "task": "sort",
        **asdict(task),
        "pad": PAD,
        "eos": EOS,
        "bos": BOS,
        "sep": SEP,
        "digit0": DIGIT0,
        "seed": args.seed,
        "steps_run": len(losses),
        "steps": args.steps,
        "batch": args.batch,
        "parameters": params,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "stopped_on_time": stopped_early,
    }
    (args.out / "task.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
