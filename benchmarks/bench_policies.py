"""Denoise policies on a trained tiny DiffusionGemma: exact-match accuracy vs decoder steps per token.

The speed/quality curve users choose a policy from. Needs a checkpoint from
`benchmarks/train_tiny_diffusion_gemma.py` (BF16 weights + task.json); the NVFP4 variant is made on the fly
with `nvfp4_ext.quantize.quantize_checkpoint(recipe="w4a16")` and run dequantized. Both run in float32 on
CPU through the reference driver (`stats="fused"`), on the same held-out prompts and seed.

    python benchmarks/bench_policies.py --model artifacts/dg_add --out benchmarks/results/cpu/policies.json

Prints a table and writes JSON (`--out`) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_diffusion_gemma import SortTask, task_from_metadata  # noqa: E402

from nvfp4_ext.diffusion.driver import default_settings, generate  # noqa: E402
from nvfp4_ext.diffusion.loading import load_diffusion_gemma  # noqa: E402
from nvfp4_ext.diffusion.policies import get_policy  # noqa: E402

# Policy settings; each runs at every step cap of --max-steps (the cap is the other speed knob: a model
# that never gets confident runs every canvas to the cap).
POLICY_GRID: list[tuple[str, dict]] = (
    [("entropy_bound", {"bound": b}) for b in (0.1, 1.0, 3.0)]
    + [("confidence", {"threshold": t}) for t in (0.95, 0.7, 0.4)]
    + [("fixed_k", {"k": k}) for k in (1, 2, 6)]
)


def evaluate(
    model,
    task: SortTask,
    prompts: torch.Tensor,
    answers: torch.Tensor,
    policy_name: str,
    params: dict,
    max_steps: int,
    seed: int,
) -> dict:
    """One (weights, policy, setting) point: exact match, token accuracy and steps per committed token."""
    policy = get_policy(policy_name, **params)
    settings = default_settings(model, max_denoising_steps=max_steps)
    result = generate(
        model,
        prompts,
        settings=settings,
        policy=policy,
        max_new_tokens=task.answer_length,
        stats="fused",
        seed=seed,
    )
    output = result.new_tokens[:, : task.answer_length]
    steps = torch.tensor(result.steps[0], dtype=torch.float32)
    return {
        "policy": policy_name,
        "params": params,
        "exact_match": float((output == answers).all(dim=1).float().mean()),
        "token_accuracy": float((output == answers).float().mean()),
        "steps_per_token": float(steps.mean() / task.answer_length),
        "mean_steps": float(steps.mean()),
    }


def plot(rows: list[dict], path: Path, task_label: str) -> None:
    """Exact match and token accuracy vs steps per token; colour = policy setting, line style = weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["policy"], json.dumps(r["params"], sort_keys=True)) for r in rows})
    colors = plt.get_cmap("tab10")
    markers = {"entropy_bound": "o", "confidence": "s", "fixed_k": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, metric in zip(axes, ("exact_match", "token_accuracy"), strict=True):
        for index, (policy, params) in enumerate(settings):
            for weights, style in (("bf16", "-"), ("nvfp4", "--")):
                points = sorted(
                    (r["steps_per_token"], r[metric])
                    for r in rows
                    if r["weights"] == weights
                    and r["policy"] == policy
                    and json.dumps(r["params"], sort_keys=True) == params
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    setting = ",".join(f"{k}={v}" for k, v in json.loads(params).items())
                    ax.plot(
                        xs,
                        ys,
                        style,
                        marker=markers[policy],
                        color=colors(index % 10),
                        alpha=0.85,
                        label=f"{policy} {setting} ({weights})",
                    )
        ax.set_xlabel("decoder steps per committed token")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"Denoise policies on a trained tiny DiffusionGemma ({task_label}); solid BF16, dashed NVFP4"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="checkpoint from train_tiny_diffusion_gemma.py"
    )
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument(
        "--max-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="max_denoising_steps caps to sweep"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-nvfp4", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON output (the PNG goes next to it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = json.loads((args.model / "task.json").read_text())
    task = task_from_metadata(meta)
    prompts, answers = task.held_out(args.examples, args.seed)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_policies_") as tmp:
        variants = {"bf16": args.model}
        if not args.skip_nvfp4:
            from nvfp4_ext.quantize import quantize_checkpoint

            variants["nvfp4"] = quantize_checkpoint(
                args.model, Path(tmp) / "nvfp4", recipe="w4a16", progress=False
            )
        print(
            f"{'weights':>7} {'policy':>13} {'setting':>22} {'exact':>7} {'token acc':>9} {'steps/token':>11}"
        )
        for weights, path in variants.items():
            model = load_diffusion_gemma(path, "float32")
            for (name, params), max_steps in ((p, m) for p in POLICY_GRID for m in args.max_steps):
                row = {
                    "weights": weights,
                    "max_steps": max_steps,
                    **evaluate(model, task, prompts, answers, name, params, max_steps, args.seed),
                }
                rows.append(row)
                setting = ",".join(f"{k}={v}" for k, v in params.items()) + f",N={max_steps}"
                print(
                    f"{weights:>7} {name:>13} {setting:>22} {row['exact_match']:>7.3f} "
                    f"{row['token_accuracy']:>9.3f} {row['steps_per_token']:>11.3f}"
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env = {
            "torch": torch.__version__,
            "device": "cpu",
            "date": datetime.date.today().isoformat(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "model": meta,
        }
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
        plot(rows, args.out.with_suffix(".png"), f"{task.name}-{task.num_digits} task")
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
