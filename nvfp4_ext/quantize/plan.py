"""Which tensor becomes what: recipes, default excludes, fused-expert splitting and output tensor names.

A plan is computed from the input headers alone, before any weight is read. Every input tensor gets one
`TensorTask`: copy it unchanged, quantize a 2-D linear weight (NVFP4 or FP8), or split a fused 3-D expert
tensor (`experts.gate_up_proj [E, 2I, H]`, first I rows = gate; `experts.down_proj [E, H, I]`) into
per-expert `experts.{e}.gate_proj|up_proj|down_proj` NVFP4 modules, the names vLLM's and SGLang's
per-expert loaders map onto `w13_*` / `w2_*`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from nvfp4_ext.errors import ConfigError
from nvfp4_ext.format import NVFP4_BLOCK_SIZE
from nvfp4_ext.quantize.io import OutputTensor, SourceTensor
from nvfp4_ext.quantize.options import OUTPUT_FORMATS, RECIPES

__all__ = [
    "DEFAULT_EXCLUDES",
    "OUTPUT_FORMATS",
    "RECIPES",
    "FusedExperts",
    "TensorTask",
    "plan_tasks",
]

Scheme = Literal["nvfp4", "nvfp4_w4a16", "fp8", "fp8_block", "unquantized"]

# Module-name patterns (fnmatch) kept in source precision: embeddings, LM head, norms, MoE routers (Gemma 4
# `router.proj`, Qwen/Mixtral `mlp.gate`), vision towers/projectors, DiffusionGemma's self-conditioning MLP.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "*embed*",
    "lm_head",
    "*.lm_head",
    "*norm*",
    "*router*",
    "*.mlp.gate",
    "*.block_sparse_moe.gate",
    "*shared_expert_gate*",
    "*vision*",
    "*visual*",
    "*multi_modal_projector*",
    "*self_conditioning*",
)

_PER_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")
_FUSED_EXPERT = re.compile(r"^(?P<parent>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_DENSE_SEGMENTS = {
    "self_attn",
    "attn",
    "attention",
    "cross_attn",
    "mlp",
    "feed_forward",
    "ffn",
    "shared_expert",
    "shared_experts",
}


@dataclass(frozen=True)
class FusedExperts:
    """How a fused 3-D expert tensor was split, so `dequantize_checkpoint` can re-fuse it."""

    source: str
    parent: str
    projections: tuple[str, ...]
    num_experts: int
    shape: tuple[int, ...]
    dtype: str

    def module(self, expert: int, projection: str) -> str:
        return f"{self.parent}.{expert}.{projection}"


@dataclass
class TensorTask:
    """What to do with one input tensor.

    Attributes:
        source: the input tensor.
        action: "copy", "linear" (2-D weight) or "experts" (fused 3-D expert tensor split per expert).
        scheme: target scheme of the module(s); "unquantized" for copies.
        modules: module names (no `.weight`) this task produces; per expert for fused experts.
        outputs: output tensors in write order.
        reason: why a weight-like tensor stays in source precision (logged and recorded), else None.
        fused: split description for fused experts.
    """

    source: SourceTensor
    action: Literal["copy", "linear", "experts"]
    scheme: Scheme = "unquantized"
    modules: list[str] = field(default_factory=list)
    outputs: list[OutputTensor] = field(default_factory=list)
    reason: str | None = None
    fused: FusedExperts | None = None


def _matches(module: str, patterns: Sequence[str]) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(module, pattern) or module == pattern:
            return pattern
    return None


# BERT-style encoders name their MLP `layer.N.intermediate.dense` (up) and `layer.N.output.dense` (down);
# `layer.N.attention.output.dense` is caught by the `attention` segment.
_ENCODER_MLP = re.compile(r"(^|\.)(intermediate\.dense|layer\.\d+\.output\.dense)$")


def _is_dense(module: str) -> bool:
    """Attention or MLP linear (the layers recipe `mixed` puts in FP8)."""
    return bool(_DENSE_SEGMENTS & set(module.split("."))) or bool(_ENCODER_MLP.search(module))


def _scheme(module: str, is_expert: bool, recipe: str, calibrated: bool) -> Scheme | None:
    """The recipe's scheme for a quantizable module, or None when the recipe keeps it in source precision."""
    if recipe == "nvfp4":
        return "nvfp4"
    if recipe == "w4a16":
        return "nvfp4_w4a16"
    if is_expert:
        return "nvfp4" if calibrated else "nvfp4_w4a16"
    if _is_dense(module):
        return "fp8" if calibrated else "fp8_block"
    return None


def _weight_outputs(module: str, scheme: Scheme, shape: tuple[int, int], fmt: str) -> list[OutputTensor]:
    n, k = shape
    if scheme in ("nvfp4", "nvfp4_w4a16"):
        scalar = () if fmt == "modelopt" else (1,)
        packed = "weight" if fmt == "modelopt" else "weight_packed"
        global_name = "weight_scale_2" if fmt == "modelopt" else "weight_global_scale"
        out = [
            OutputTensor(f"{module}.{packed}", "U8", (n, k // 2)),
            OutputTensor(f"{module}.weight_scale", "F8_E4M3", (n, k // NVFP4_BLOCK_SIZE)),
            OutputTensor(f"{module}.{global_name}", "F32", scalar),
        ]
        if scheme == "nvfp4":
            input_name = "input_scale" if fmt == "modelopt" else "input_global_scale"
            out.append(OutputTensor(f"{module}.{input_name}", "F32", scalar))
        return out
    if scheme == "fp8":
        return [
            OutputTensor(f"{module}.weight", "F8_E4M3", (n, k)),
            OutputTensor(f"{module}.weight_scale", "F32", ()),
            OutputTensor(f"{module}.input_scale", "F32", ()),
        ]
    if scheme == "fp8_block":
        return [
            OutputTensor(f"{module}.weight", "F8_E4M3", (n, k)),
            OutputTensor(f"{module}.weight_scale", "F32", (-(-n // 128), -(-k // 128))),
        ]
    raise ValueError(f"no outputs for scheme {scheme}")


def _copy(tensor: SourceTensor, reason: str | None = None, module: str | None = None) -> TensorTask:
    task = TensorTask(
        tensor, "copy", outputs=[OutputTensor(tensor.name, tensor.dtype, tensor.shape)], reason=reason
    )
    if module is not None:
        task.modules = [module]
    return task


def _expert_layout_ok(name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> bool:
    """Gemma 4 layout check: gate_up [E, 2I, H] and down [E, H, I] (rejects transposed [E, H, 2I] layouts)."""
    parent = name.rsplit(".", 1)[0]
    gate_up, down = shapes.get(f"{parent}.gate_up_proj"), shapes.get(f"{parent}.down_proj")
    if gate_up is None or down is None or len(gate_up) != 3 or len(down) != 3:
        return False
    return gate_up[0] == down[0] and gate_up[1] == 2 * down[2] and gate_up[2] == down[1]


def plan_tasks(
    tensors: Sequence[SourceTensor],
    *,
    recipe: str,
    calibrated: bool,
    exclude: Sequence[str] = (),
    output_format: str = "modelopt",
) -> list[TensorTask]:
    """Decide every input tensor's fate.

    Args:
        tensors: the input checkpoint's tensors.
        recipe: "nvfp4" (W4A4), "w4a16" or "mixed".
        calibrated: whether activation amax is available (W4A4 / static FP8 possible).
        exclude: user fnmatch patterns on module names, added to `DEFAULT_EXCLUDES`.
        output_format: "modelopt" or "compressed-tensors" (tensor names differ).
    Raises:
        ConfigError: unknown recipe or format.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe: unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"--format: unknown format {output_format!r}; expected one of {', '.join(OUTPUT_FORMATS)}"
        )
    patterns = (*DEFAULT_EXCLUDES, *exclude)
    shapes = {t.name: t.shape for t in tensors}
    tasks = []
    for tensor in tensors:
        floating = tensor.dtype in ("F32", "F16", "BF16")
        fused = _FUSED_EXPERT.match(tensor.name)
        if fused and floating and len(tensor.shape) == 3:
            tasks.append(_plan_experts(tensor, fused, shapes, patterns, recipe, calibrated, output_format))
            continue
        if not (floating and tensor.name.endswith(".weight") and len(tensor.shape) == 2):
            tasks.append(_copy(tensor))
            continue
        module = tensor.name[: -len(".weight")]
        if _matches(module, patterns):
            tasks.append(_copy(tensor, module=module))  # default/user exclude: no log, it is expected
            continue
        scheme = _scheme(module, bool(_PER_EXPERT.search(module)), recipe, calibrated)
        if scheme is None:
            tasks.append(
                _copy(
                    tensor,
                    f"recipe {recipe} keeps non-attention, non-MLP linears in source precision",
                    module,
                )
            )
            continue
        if scheme.startswith("nvfp4") and tensor.shape[1] % NVFP4_BLOCK_SIZE:
            reason = f"K={tensor.shape[1]} is not a multiple of {NVFP4_BLOCK_SIZE}"
            tasks.append(_copy(tensor, reason, module))
            continue
        task = TensorTask(tensor, "linear", scheme, [module])
        task.outputs = _weight_outputs(module, scheme, tensor.shape, output_format)  # type: ignore[arg-type]
        tasks.append(task)
    return tasks


def _plan_experts(
    tensor: SourceTensor,
    fused: re.Match,
    shapes: dict[str, tuple[int, ...]],
    patterns: Sequence[str],
    recipe: str,
    calibrated: bool,
    output_format: str,
) -> TensorTask:
    parent, proj = fused["parent"], fused["proj"]
    if _matches(tensor.name, patterns) or _matches(parent, patterns):
        return _copy(tensor, module=tensor.name)
    if not _expert_layout_ok(tensor.name, tensor.shape, shapes):
        return _copy(tensor, "fused expert layout is not [E, 2I, H] / [E, H, I]", tensor.name)
    num_experts, rows, k = tensor.shape
    projections = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
    if k % NVFP4_BLOCK_SIZE:
        return _copy(tensor, f"K={k} is not a multiple of {NVFP4_BLOCK_SIZE}", tensor.name)
    scheme = _scheme(tensor.name, True, recipe, calibrated)
    assert scheme is not None
    split = FusedExperts(tensor.name, parent, projections, num_experts, tensor.shape, tensor.dtype)
    task = TensorTask(tensor, "experts", scheme, fused=split)
    rows_each = rows // len(projections)
    for expert in range(num_experts):
        for projection in projections:
            module = split.module(expert, projection)
            task.modules.append(module)
            task.outputs += _weight_outputs(module, scheme, (rows_each, k), output_format)
    return task
