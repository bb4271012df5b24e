"""Per-module records: which tensors make up each linear/expert module, and its scheme.

A module is a weight of rank >= 2: `<P>.weight` (ModelOpt, unquantized, FP8), `<P>.weight_packed`
(compressed-tensors NVFP4) or a bare 3-D/2-D parameter such as `<...>.experts.gate_up_proj` (fused MoE
experts). Its companion tensors, by convention:

| role           | ModelOpt                 | compressed-tensors           | bare parameter `<P>`   |
|----------------|--------------------------|------------------------------|------------------------|
| weight         | `P.weight` (U8/F8/float) | `P.weight_packed` (U8)       | `P`                    |
| weight_scale   | `P.weight_scale`         | `P.weight_scale`             | `P_weight_scale`       |
| weight_global  | `P.weight_scale_2`       | `P.weight_global_scale`      | `P_weight_scale_2`     |
| input_global   | `P.input_scale`          | `P.input_global_scale`       | `P_input_scale`        |

The scheme comes from the quantization config (`QuantConfig.scheme_for`) and must agree with the stored
tensors; a module the config would quantize but which is stored in float is accepted only when engines
never quantize it anyway (embeddings, vision towers: `kept_unquantized`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nvfp4_ext.checkpoint.config import NVFP4_SCHEMES, Scheme
from nvfp4_ext.errors import CheckpointError
from nvfp4_ext.format import FP8_BLOCK, NVFP4_BLOCK_SIZE

if TYPE_CHECKING:
    from nvfp4_ext.checkpoint.reader import Checkpoint

__all__ = [
    "ALWAYS_UNQUANTIZED",
    "AUX_SUFFIXES",
    "ModuleRecord",
    "is_embedding",
    "kept_unquantized",
    "resolve_modules",
]

_ROLE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "weight_scale": ("weight_scale",),
    "weight_global": ("weight_scale_2", "weight_global_scale"),
    "input_global": ("input_scale", "input_global_scale"),
}
# Tensor leaves that belong to a module without being one.
AUX_SUFFIXES = (
    "weight_scale",
    "weight_scale_2",
    "weight_global_scale",
    "input_scale",
    "input_global_scale",
    "weight_zero_point",
    "k_scale",
    "v_scale",
)
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# dtypes a stored layer weight can have; integer and bool tensors under other names are buffers
# (`position_ids`, `token_type_ids`, attention masks), which transformers writes beside the layers.
_WEIGHT_DTYPES = ("U8", "F8_E4M3", *_FLOAT_DTYPES)


@dataclass(frozen=True)
class ModuleRecord:
    """One linear/expert module of a checkpoint.

    Attributes:
        name: HF module name without `.weight` (or the bare parameter name).
        scheme: resolved scheme.
        shape: unpacked weight shape, [N, K] or [E, N, K].
        tensors: role -> tensor name; roles "weight", "weight_scale", "weight_global", "input_global".
        stored_scheme: what the tensors alone say (before the config is consulted).
        reason: why an unquantized module is unquantized (pattern, embedding, not listed), else None.
        file: file holding the weight.
    """

    name: str
    scheme: Scheme
    shape: tuple[int, ...]
    tensors: dict[str, str] = field(compare=False)
    stored_scheme: str
    reason: str | None
    file: str

    @property
    def params(self) -> int:
        """Number of weight elements (unpacked)."""
        return math.prod(self.shape)

    @property
    def is_expert(self) -> bool:
        """Whether this is a fused 3-D expert tensor [E, N, K]."""
        return len(self.shape) == 3


def is_embedding(module: str) -> bool:
    """Embedding tables (never quantized by engines), e.g. `embed_tokens`, `position_embedding_table`."""
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf and not leaf.endswith(("_proj", "projection"))


# Module-path components engines keep unquantized whatever the config says (vLLM's ModelOpt config
# hard-codes the first three; `embed_vision` is DiffusionGemma's vision embedder).
ALWAYS_UNQUANTIZED = ("vision_tower", "vision_model", "vit_large_projector", "embed_vision")


def kept_unquantized(module: str) -> str | None:
    """Why engines never quantize `module` (embedding, vision tower), or None."""
    if is_embedding(module):
        return "embedding"
    parts = module.split(".")
    for component in ALWAYS_UNQUANTIZED:
        if component in parts:
            return f"{component} (engines keep it unquantized)"
    return None


def _candidates(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    """module name -> (weight tensor name, separator for companion tensors)."""
    found: dict[str, tuple[str, str]] = {}
    for name in ckpt.tensor_names():
        info = ckpt.tensor_info(name)
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight_packed":
            found[prefix] = (name, ".")
        elif leaf == "weight":
            if len(info.shape) >= 2 and prefix not in found:
                found[prefix] = (name, ".")
        elif (
            len(info.shape) >= 2
            and info.dtype in _WEIGHT_DTYPES
            and leaf not in AUX_SUFFIXES
            and not leaf.endswith(tuple(f"_{s}" for s in AUX_SUFFIXES))
        ):
            found[name] = (name, "_")
    return found


def _stored_scheme(ckpt: Checkpoint, module: str, tensors: dict[str, str]) -> str:
    weight = ckpt.tensor_info(tensors["weight"])
    if weight.dtype == "U8":
        return "nvfp4" if "input_global" in tensors else "nvfp4_w4a16"
    if weight.dtype == "F8_E4M3":
        scale_name = tensors.get("weight_scale")
        if scale_name is None:
            return "fp8"
        scale = ckpt.tensor_info(scale_name)
        n = weight.shape[-2]
        lead = weight.shape[:-2]
        if scale.numel == 1 or scale.shape == lead or scale.shape == (*lead, 1):
            return "fp8"
        if scale.shape in ((*lead, n), (*lead, n, 1)):
            return "fp8_channel"
        return "fp8_block"
    if weight.dtype in _FLOAT_DTYPES:
        return "unquantized"
    raise CheckpointError(
        f"weight dtype {weight.dtype} is none of U8 (NVFP4), F8_E4M3 (FP8) or a float type",
        file=weight.file,
        tensor=weight.name,
    )


def _unpacked_shape(ckpt: Checkpoint, tensors: dict[str, str], stored: str) -> tuple[int, ...]:
    shape = ckpt.tensor_info(tensors["weight"]).shape
    if stored in NVFP4_SCHEMES:
        return (*shape[:-1], 2 * shape[-1])
    return shape


def _fp8_granularity_if_compatible(
    ckpt: Checkpoint, tensors: dict[str, str], configured: str, stored: str
) -> str:
    """A weight no larger than one 128x128 block has a [1, 1] block scale that also reads as per-tensor:
    trust the config whenever the stored scale shape fits its granularity."""
    weight = ckpt.tensor_info(tensors["weight"])
    scale = ckpt.tensor_info(tensors["weight_scale"]).shape
    lead, n = weight.shape[:-2], weight.shape[-2]
    accepted = {
        "fp8": ((), (1,), (1, 1), lead, (*lead, 1)),
        "fp8_channel": ((*lead, n), (*lead, n, 1)),
        "fp8_block": ((*lead, *_fp8_block_grid(weight.shape)),),
    }[configured]
    return configured if scale in accepted else stored


def _fp8_block_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    return (-(-shape[-2] // FP8_BLOCK[0]), -(-shape[-1] // FP8_BLOCK[1]))


def _reconcile(
    ckpt: Checkpoint, module: str, configured: str, stored: str, weight_name: str
) -> tuple[str, str | None]:
    """Final scheme and reason, or a CheckpointError when config and tensors disagree."""
    cfg = ckpt.quant_config
    info = ckpt.tensor_info(weight_name)
    if configured == stored:
        if stored != "unquantized":
            return stored, None
        pattern = cfg.excluded_by(module) if cfg else None
        if pattern == module:
            return stored, "named in the exclude list"
        if pattern is not None:
            return stored, f"excluded by pattern {pattern!r}"
        if cfg is None:
            return stored, "checkpoint has no quantization config"
        return stored, kept_unquantized(module) or "not listed as quantized by the config"
    if stored == "unquantized" and kept_unquantized(module):
        return stored, kept_unquantized(module)
    if stored == "unquantized" and len(info.shape) > 3:
        return stored, f"not a linear layer ({len(info.shape)}-D weight)"
    if stored == "unquantized" and len(info.shape) != 2 and cfg and cfg.quantized_by_targets(module):
        # An nn.Linear weight is 2-D; a BF16 3-D weight a target matches is some other module (Conv1d
        # [C, 1, K]), which compressed-tensors does not quantize whatever its targets say.
        return stored, f"not an nn.Linear ({len(info.shape)}-D weight): compressed-tensors keeps it as is"
    if configured == "nvfp4_w4a16" and stored == "nvfp4":
        return configured, None  # engines drop the unused activation scale of weight-only layers
    source = cfg.source if cfg else "no quantization config"
    if configured == "nvfp4" and stored == "nvfp4_w4a16":
        raise CheckpointError(
            f"missing input scale: {source} says NVFP4 W4A4 ({cfg.quant_algo}) but the module has no "
            "input_scale/input_global_scale tensor",
            file=info.file,
            tensor=weight_name,
        )
    if (
        configured == "unquantized"
        and stored in NVFP4_SCHEMES
        and "weight_scale" not in _companions(ckpt, module)
    ):
        raise CheckpointError(
            f"missing weight_scale: weight is packed U8 (NVFP4) but there is no weight_scale tensor "
            f"(and {source} does not quantize this module)",
            file=info.file,
            tensor=weight_name,
        )
    raise CheckpointError(
        f"config and tensors disagree: {source} says {configured} but the stored tensors are {stored} "
        f"(weight dtype {info.dtype}, shape {list(info.shape)})",
        file=info.file,
        tensor=weight_name,
    )


def _companions(ckpt: Checkpoint, module: str, sep: str = ".") -> dict[str, str]:
    found = {}
    for role, suffixes in _ROLE_SUFFIXES.items():
        for suffix in suffixes:
            if ckpt.has(f"{module}{sep}{suffix}"):
                found[role] = f"{module}{sep}{suffix}"
                break
    return found


def resolve_modules(ckpt: Checkpoint) -> list[ModuleRecord]:
    """Build the record of every module of an opened checkpoint (headers only, no tensor data).

    Raises:
        CheckpointError: config/tensor disagreement or a quantized weight without its scales.
    """
    from nvfp4_ext.checkpoint.validate import check_headers  # validate builds on this module

    records = []
    for module, (weight_name, sep) in sorted(_candidates(ckpt).items()):
        tensors = {"weight": weight_name, **_companions(ckpt, module, sep)}
        stored = _stored_scheme(ckpt, module, tensors)
        configured = ckpt.quant_config.scheme_for(module) if ckpt.quant_config else "unquantized"
        if stored.startswith("fp8") and configured.startswith("fp8") and stored != configured:
            stored = _fp8_granularity_if_compatible(ckpt, tensors, configured, stored)
        scheme, reason = _reconcile(ckpt, module, configured, stored, weight_name)
        record = ModuleRecord(
            name=module,
            scheme=scheme,  # type: ignore[arg-type]
            shape=_unpacked_shape(ckpt, tensors, stored),
            tensors=tensors,
            stored_scheme=stored,
            reason=reason,
            file=ckpt.tensor_info(weight_name).file,
        )
        check_headers(ckpt, record)
        records.append(record)
    return records


def expected_block_scale_shape(record: ModuleRecord) -> tuple[int, ...]:
    """[..., N, K/16] for NVFP4 modules."""
    return (*record.shape[:-1], record.shape[-1] // NVFP4_BLOCK_SIZE)


def expected_fp8_scale_shapes(record: ModuleRecord) -> tuple[tuple[int, ...], ...]:
    """Accepted FP8 weight_scale shapes for the record's scheme."""
    lead, n = record.shape[:-2], record.shape[-2]
    if record.scheme == "fp8":
        return ((), (1,), (1, 1), lead, (*lead, 1)) if lead else ((), (1,), (1, 1))
    if record.scheme == "fp8_channel":
        return ((*lead, n), (*lead, n, 1))
    return ((*lead, *_fp8_block_grid(record.shape)),)
