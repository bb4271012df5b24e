"""Train a tiny DiffusionGemma (transformers' classes, ~1.5 M parameters) on digit addition or sorting.

Random weights make every denoise policy degenerate (near-uniform entropy), so comparing policies needs a
model that has learned something. Tasks (`--task`), both with one canvas holding the whole answer so exact
match is checkable:
- `add` (default): prompt `<bos> a1..aN + b1..bN <sep>`, canvas the N + 1 digits of the sum. Each digit hangs
  on a carry chain, so the tiny model is not always right in one forward and the policies separate;
- `sort`: prompt `<bos> d1..dN <sep>`, canvas the N digits sorted ascending. Every position is a fixed
  function of the prompt; the model learns it perfectly within the budget and every policy scores 1.0.
Objective: uniform corruption (shared/reference/diffusiongemma.md): per example a corruption rate
r ~ U(0, 1), each canvas position replaced by a uniform random token id with probability r, the decoder run
over the corrupted canvas with the prompt's KV cache, cross-entropy against the clean canvas; with
probability 1/2 a first no-grad pass provides `self_conditioning_logits`, as at inference.

Budget: the whole run (training, saving, evaluation) must fit `--max-minutes` (default 10) on 2 CPU cores.
The default 1500 steps take about 2 minutes on a quiet 2-core machine; the script prints the projected
training time after a few steps and stops on the cap if the machine is too loaded (reported as
`stopped_on_time`, since stopping on time makes the weights machine-dependent). One thread is the default:
the ops are too small to gain from a second one, and one thread does not collapse when other jobs share
the cores. Deterministic from `--seed` for fixed `--steps` and `--threads`.

At the end the saved BF16 weights are evaluated with the checkpoint's default policy (`entropy_bound` 0.1,
16 denoising steps) on the same held-out prompts `bench_policies.py` uses, and the exact match is printed
and stored. Writes a BF16 HF checkpoint (+ tokenizer, generation_config, task.json) to `--out`; weights are
never committed.

    python benchmarks/train_tiny_diffusion_gemma.py --out artifacts/dg_add [--task add --steps 1500 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

PAD, EOS, BOS, SEP, PLUS = 0, 1, 2, 3, 4
DIGIT0 = 10  # token id of digit 0


@dataclass(frozen=True)
class SortTask:
    """Sort `num_digits` digits; the answer fills one canvas exactly."""

    num_digits: int = 8
    vocab_size: int = 32
    name: ClassVar[str] = "sort"

    @property
    def answer_length(self) -> int:
        return self.num_digits

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, N + 2] prompts, [batch, N] sorted answers), token ids."""
        digits = torch.randint(0, 10, (batch, self.num_digits), generator=generator)
        prompt = torch.cat([torch.full((batch, 1), BOS), digits + DIGIT0, torch.full((batch, 1), SEP)], dim=1)
        return prompt, digits.sort(dim=1).values + DIGIT0

    def held_out(self, examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation prompts and answers (a generator stream the training batches never use)."""
        return self.sample(examples, torch.Generator().manual_seed(10_000 + seed))


@dataclass(frozen=True)
class AddTask(SortTask):
    """Add two `num_digits`-digit numbers (most significant digit first); the answer is N + 1 digits.

    Unlike sorting, each answer digit depends on a carry chain, so a tiny model is not right in one
    forward and committing fewer, surer digits per step pays off: the policies separate.
    """

    name: ClassVar[str] = "add"

    @property
    def answer_length(self) -> int:
        return self.num_digits + 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, 2N + 3] prompts `<bos> a + b <sep>`, [batch, N + 1] zero-padded sums), token ids."""
        operands = torch.randint(0, 10, (batch, 2, self.num_digits), generator=generator)
        powers = 10 ** torch.arange(self.num_digits - 1, -1, -1)
        total = (operands * powers).sum(dim=2).sum(dim=1, keepdim=True)
        answer_powers = 10 ** torch.arange(self.num_digits, -1, -1)
        answer = total // answer_powers % 10
        prompt = torch.cat(
            [
                torch.full((batch, 1), BOS),
                operands[:, 0] + DIGIT0,
                torch.full((batch, 1), PLUS),
                operands[:, 1] + DIGIT0,
                torch.full((batch, 1), SEP),
            ],
            dim=1,
        )
        return prompt, answer + DIGIT0


TASKS: dict[str, type[SortTask]] = {"sort": SortTask, "add": AddTask}


def task_from_metadata(meta: dict) -> SortTask:
    """The task a checkpoint was trained on, from its task.json."""
    return TASKS[meta.get("task", "sort")](num_digits=meta["num_digits"], vocab_size=meta["vocab_size"])


def build_model(task: SortTask, seed: int):
    """A DiffusionGemma sized for the task (tiny_models recipe with a task-sized vocabulary and canvas)."""
    from nvfp4_ext.tiny_models import tiny_diffusion_gemma_model

    assert (PAD, EOS, BOS) == (0, 1, 2), "tiny_diffusion_gemma_model's special ids"
    return tiny_diffusion_gemma_model(
        vocab_size=task.vocab_size,
        canvas_length=task.answer_length,
        max_new_tokens=task.answer_length,
        seed=seed,
        sliding_window=32,
        max_position_embeddings=256,
        max_denoising_steps=16,
        eos_token_id=[EOS],
    ).train()


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


def exact_match_with_default_policy(model_dir: Path, task: SortTask, examples: int, seed: int) -> dict:
    """Exact match and steps per token of the saved checkpoint with its generation_config's policy."""
    from nvfp4_ext.diffusion.driver import default_policy, default_settings, generate
    from nvfp4_ext.diffusion.loading import load_diffusion_gemma

    model = load_diffusion_gemma(model_dir, "float32")
    prompts, answers = task.held_out(examples, seed)
    result = generate(
        model,
        prompts,
        settings=default_settings(model),
        policy=default_policy(model),
        max_new_tokens=task.answer_length,
        stats="fused",
        seed=seed,
    )
    output = result.new_tokens[:, : task.answer_length]
    return {
        "eval_examples": examples,
        "eval_exact_match": float((output == answers).all(dim=1).float().mean()),
        "eval_token_accuracy": float((output == answers).float().mean()),
        "eval_steps_per_token": sum(result.steps[0]) / (examples * task.answer_length),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--task", choices=sorted(TASKS), default="add")
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out prompts (0: skip)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=10.0,
        help="wall-time budget of the whole run; training stops on it (breaks determinism if hit)",
    )
    args = parser.parse_args(argv)

    from nvfp4_ext.tiny_models import write_tokenizer

    budget = args.max_minutes * 60
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    task = TASKS[args.task](num_digits=args.digits)
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
        f"DiffusionGemma {task.name}-{task.num_digits}: {params / 1e6:.2f} M parameters, "
        f"{args.steps} steps x "
        f"batch {args.batch}, {args.threads} threads, budget {budget:.0f} s"
    )
    # Saving and evaluating take a few seconds; keep that much of the budget for them.
    train_budget = budget - min(30.0, 0.05 * budget)
    losses, stopped_early = [], False
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
        if step == 0:
            first_step_done = elapsed  # the first step pays one-off warm-up; project from the next ones
        if step == 20 and args.steps > 21:
            projected = elapsed + (elapsed - first_step_done) / 20 * (args.steps - 21)
            verdict = "within" if projected <= train_budget else "OVER"
            print(
                f"projected training time {projected:.0f} s ({verdict} the {train_budget:.0f} s budget)",
                flush=True,
            )
        if step % 100 == 0 or step == args.steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step:5d}  loss {recent:.4f}  {elapsed:6.0f} s", flush=True)
        if elapsed > train_budget and step < args.steps - 1:
            print(f"stopping at step {step + 1}: {train_budget:.0f} s budget reached (not deterministic)")
            stopped_early = True
            break
    train_seconds = time.perf_counter() - start
    model.eval().to(torch.bfloat16).save_pretrained(args.out)
    write_tokenizer(args.out, task.vocab_size)
    summary = {
        "task": task.name,
        **asdict(task),
        "pad": PAD,
        "eos": EOS,
        "bos": BOS,
        "sep": SEP,
        "plus": PLUS,
        "digit0": DIGIT0,
        "seed": args.seed,
        "steps_run": len(losses),
        "steps": args.steps,
        "batch": args.batch,
        "threads": args.threads,
        "parameters": params,
        "train_seconds": round(train_seconds, 1),
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "stopped_on_time": stopped_early,
    }
    if args.eval_examples > 0:
        summary.update(exact_match_with_default_policy(args.out, task, args.eval_examples, args.seed))
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    summary["budget_seconds"] = budget
    (args.out / "task.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    status = "within" if summary["total_seconds"] <= budget else "OVER"
    report = (
        f"trained {len(losses)} steps in {summary['train_seconds']:.0f} s, total "
        f"{summary['total_seconds']:.0f} s ({status} the {budget:.0f} s budget); "
        f"final loss {summary['final_loss']:.4f}"
    )
    if "eval_exact_match" in summary:
        report += f"; exact match {summary['eval_exact_match']:.3f} with the default policy"
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
