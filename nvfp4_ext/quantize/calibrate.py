"""Activation calibration for W4A4 / static-FP8 recipes: run the source model on a text, record input amax.

The source model runs with transformers on CPU (float32). Forward pre-hooks on every `nn.Linear` record the
absolute max of its input; fused expert modules (transformers' `*Experts` with 3-D `gate_up_proj` /
`down_proj` parameters, used for Gemma 4, DiffusionGemma and Qwen3-MoE) get a hook that records, per expert,
the amax of the tokens routed to it and of that expert's intermediate activation. Experts no calibration
token reached fall back to the layer's amax over all routed tokens.

Results are keyed by checkpoint module names (`model.layers.0.self_attn.q_proj`,
`model.layers.0.experts.3.gate_proj`), resolved through parameter identity so tied modules (DiffusionGemma's
encoder and decoder share weights) map to the name the checkpoint stores.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch

from nvfp4_ext.errors import ConfigError

__all__ = ["collect_activation_amax"]

log = logging.getLogger(__name__)


def _load_model(model_dir: Path) -> tuple[torch.nn.Module, object]:
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _is_experts(module: torch.nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.nn.Parameter)
        and isinstance(down, torch.nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
        and hasattr(module, "act_fn")
    )


class _AmaxRecorder:
    """Hooks that accumulate amax per Linear weight and per (experts weight, expert index)."""

    def __init__(self) -> None:
        self.linear: dict[int, float] = defaultdict(float)
        self.expert_in: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.expert_mid: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.layer_in: dict[int, float] = defaultdict(float)
        self.handles: list = []

    def attach(self, model: torch.nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                self.handles.append(module.register_forward_pre_hook(self._linear_hook))
            elif _is_experts(module):
                self.handles.append(module.register_forward_pre_hook(self._experts_hook))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _linear_hook(self, module: torch.nn.Module, args: tuple) -> None:
        key = id(module.weight)
        self.linear[key] = max(self.linear[key], float(args[0].detach().abs().amax()))

    def _experts_hook(self, module: torch.nn.Module, args: tuple) -> None:
        hidden, top_k_index = args[0].detach(), args[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        top_k_index = top_k_index.reshape(hidden.shape[0], -1)
        key = id(module.gate_up_proj)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < module.gate_up_proj.shape[0]:
                continue
            tokens = hidden[(top_k_index == expert).any(-1)]
            amax = float(tokens.abs().amax())
            self.expert_in[key][expert] = max(self.expert_in[key][expert], amax)
            self.layer_in[key] = max(self.layer_in[key], amax)
            gate, up = torch.nn.functional.linear(tokens, module.gate_up_proj[expert].detach()).chunk(
                2, dim=-1
            )
            mid = module.act_fn(gate) * up
            self.expert_mid[key][expert] = max(self.expert_mid[key][expert], float(mid.abs().amax()))


def _run(model: torch.nn.Module, tokenizer: object, text: str, max_tokens: int, seq_len: int) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ConfigError("--calib: the calibration text tokenizes to fewer than 2 tokens")
    canvas = getattr(model.config, "canvas_length", None)
    used = 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            chunk = torch.tensor([ids[start : start + seq_len]])
            if chunk.shape[1] < 2:
                break
            if canvas is not None:  # block diffusion: encode a prompt, denoise a canvas of the next tokens
                split = max(1, chunk.shape[1] // 2)
                prompt, target = chunk[:, :split], chunk[:, split:]
                target = torch.nn.functional.pad(target, (0, max(0, canvas - target.shape[1])), value=0)[
                    :, :canvas
                ]
                model(input_ids=prompt, decoder_input_ids=target)
            else:
                model(input_ids=chunk)
            used += chunk.shape[1]
    return used


def collect_activation_amax(
    model_dir: str | Path,
    text_file: str | Path,
    checkpoint_names: set[str],
    *,
    max_tokens: int = 4096,
    seq_len: int = 256,
) -> dict[str, float]:
    """Run the source model over a text file and return input amax per checkpoint module.

    Args:
        model_dir: the (unquantized) source checkpoint.
        text_file: calibration text (UTF-8).
        checkpoint_names: the checkpoint's tensor names, to resolve module names.
        max_tokens: tokens of the text to use.
        seq_len: tokens per forward.
    Returns:
        {module: amax} for Linear modules and per-expert `...experts.{e}.gate_proj|up_proj|down_proj`.
    Raises:
        ConfigError: unreadable or too short text, or a model transformers cannot run.
    """
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--calib: cannot read {path}: {exc}") from None
    try:
        model, tokenizer = _load_model(Path(model_dir))
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise ConfigError(f"--calib: transformers cannot load {model_dir} to calibrate: {exc}") from None
    recorder = _AmaxRecorder()
    recorder.attach(model)
    try:
        used = _run(model, tokenizer, text, max_tokens, seq_len)
    finally:
        recorder.detach()
    log.info("calibrated on %d tokens of %s", used, path)
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(name)
    result: dict[str, float] = {}
    for key, amax in recorder.linear.items():
        for name in aliases.get(key, []):
            if name in checkpoint_names:
                result[name[: -len(".weight")]] = amax
    for module in model.modules():
        if not _is_experts(module):
            continue
        key = id(module.gate_up_proj)
        parent = _experts_checkpoint_prefix(aliases.get(key, []), checkpoint_names)
        if parent is None or key not in recorder.layer_in:
            continue
        hit_in, hit_mid = recorder.expert_in[key], recorder.expert_mid[key]
        mid_fallback = max(hit_mid.values())
        for expert in range(module.gate_up_proj.shape[0]):
            amax_in = hit_in.get(expert, recorder.layer_in[key])
            result[f"{parent}.{expert}.gate_proj"] = amax_in
            result[f"{parent}.{expert}.up_proj"] = amax_in
            result[f"{parent}.{expert}.down_proj"] = hit_mid.get(expert, mid_fallback)
    return result


def _experts_checkpoint_prefix(names: list[str], checkpoint_names: set[str]) -> str | None:
    """`X.experts` whose fused (`X.experts.gate_up_proj`) or per-expert (`X.experts.0.gate_proj.weight`)
    tensors
    the checkpoint stores."""
    for name in names:
        parent = name[: -len(".gate_up_proj")]
        if name in checkpoint_names or f"{parent}.0.gate_proj.weight" in checkpoint_names:
            return parent
    return None
