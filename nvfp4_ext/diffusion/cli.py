"""`nvfp4-ext generate`: DiffusionGemma generation on CPU with transformers' model and our policies.

    nvfp4-ext generate MODEL_DIR --prompt "w5 w6" [--policy confidence --threshold 0.9] [--json]
    nvfp4-ext generate MODEL_DIR --prompt-ids 2,17,5 --seed 1 --max-new-tokens 32 --stats hf-exact --json

MODEL_DIR may be a BF16/FP32 checkpoint or an NVFP4/FP8 one written by `nvfp4-ext quantize` (dequantized on
load). `--json` prints `{"token_ids": [...], "steps": [...], ...}` for the generated tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

from nvfp4_ext.errors import ConfigError

__all__ = ["POLICY_CHOICES", "add_arguments", "parse_prompt_ids", "run"]

# CLI flag -> the policy it parameterizes. Policy names are spelled here rather than imported from
# `policies` (which imports torch) so that `generate --help` answers at once; a test keeps them equal.
_POLICY_FLAGS = {"bound": "entropy_bound", "threshold": "confidence", "k": "fixed_k"}
POLICY_CHOICES = tuple(sorted(_POLICY_FLAGS.values()))
_DEFAULT_POLICY = "entropy_bound"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="DiffusionGemma checkpoint (plain or quantized)"
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", help="prompt text (tokenized with the checkpoint's tokenizer; BOS prepended if missing)"
    )
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 2,17,5")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int, help="default: generation_config.max_new_tokens")
    parser.add_argument(
        "--policy",
        choices=POLICY_CHOICES,
        default=_DEFAULT_POLICY,
        help="denoise policy (default entropy_bound with the checkpoint's bound)",
    )
    parser.add_argument(
        "--bound", type=float, help="entropy_bound: the entropy bound (default: checkpoint, 0.1)"
    )
    parser.add_argument("--threshold", type=float, help="confidence: top-probability threshold (default 0.9)")
    parser.add_argument("--k", type=int, help="fixed_k: tokens accepted per step (default 4)")
    parser.add_argument("--max-denoising-steps", type=int, help="step cap per canvas (default: checkpoint)")
    parser.add_argument("--t-min", type=float, help="temperature at the last step")
    parser.add_argument("--t-max", type=float, help="temperature at the first step")
    parser.add_argument(
        "--stability-threshold", type=int, help="previous equal argmax canvases needed to stop"
    )
    parser.add_argument("--confidence-threshold", type=float, help="mean-entropy threshold to stop")
    parser.add_argument(
        "--stats",
        choices=["fused", "hf-exact"],
        default="fused",
        help="fused: memory-lean statistics (default); hf-exact: transformers' random stream",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="run dtype")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def parse_prompt_ids(text: str) -> list[int]:
    """ "2,17,5" -> [2, 17, 5]; raises ConfigError naming --prompt-ids."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise ConfigError("--prompt-ids: no token ids given")
    return ids


def _policy(args: argparse.Namespace, model: object | None):
    """The policy the flags ask for; with `model=None` only validates (the checkpoint default needs it)."""
    from nvfp4_ext.diffusion.driver import default_policy
    from nvfp4_ext.diffusion.policies import DEFAULT_POLICY, get_policy

    for flag, owner in _POLICY_FLAGS.items():
        if getattr(args, flag) is not None and owner != args.policy:
            raise ConfigError(f"--{flag}: applies to --policy {owner}, not {args.policy}")
    if args.policy == DEFAULT_POLICY and args.bound is None:
        return default_policy(model) if model is not None else None
    params = {flag: getattr(args, flag) for flag, owner in _POLICY_FLAGS.items() if owner == args.policy}
    try:
        return get_policy(args.policy, **params)
    except ConfigError as exc:
        raise ConfigError(f"--{exc}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from nvfp4_ext.diffusion.driver import default_settings, generate
    from nvfp4_ext.diffusion.loading import load_diffusion_gemma, load_tokenizer

    prompt_ids = parse_prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    _policy(args, None)  # flag errors before the (slow) model load
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to our one-line errors and summary
    model = load_diffusion_gemma(args.model_dir, args.dtype)
    tokenizer = load_tokenizer(args.model_dir)
    if prompt_ids is None:
        if tokenizer is None:
            raise ConfigError(f"--prompt: {args.model_dir} has no tokenizer; pass --prompt-ids instead")
        prompt_ids = tokenizer(args.prompt)["input_ids"]
        if not prompt_ids:
            raise ConfigError("--prompt: the prompt tokenizes to nothing")
        bos = tokenizer.bos_token_id
        if bos is not None and prompt_ids[0] != bos:  # DiffusionGemma prompts start with BOS
            prompt_ids = [bos, *prompt_ids]
    try:
        settings = default_settings(
            model,
            max_denoising_steps=args.max_denoising_steps,
            t_min=args.t_min,
            t_max=args.t_max,
            stability_threshold=args.stability_threshold,
            confidence_threshold=args.confidence_threshold,
        )
    except ConfigError as exc:
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
    policy = _policy(args, model)
    result = generate(
        model,
        torch.tensor([prompt_ids]),
        settings=settings,
        policy=policy,
        max_new_tokens=args.max_new_tokens,
        stats=args.stats,
        seed=args.seed,
    )
    payload = result.to_json()
    text = tokenizer.decode(payload["token_ids"], skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        payload.update(
            prompt_ids=prompt_ids,
            policy=policy.to_dict(),
            settings=settings.to_dict(),
            stats=args.stats,
            seed=args.seed,
            text=text,
        )
        print(json.dumps(payload))
    else:
        print(text if text is not None else " ".join(map(str, payload["token_ids"])))
        print(f"steps per canvas: {payload['steps']}  policy: {policy.to_dict()}", file=sys.stderr)
    return 0
