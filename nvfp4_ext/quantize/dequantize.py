"""`dequantize_checkpoint`: turn an NVFP4 / FP8 checkpoint back into a plain Hugging Face checkpoint.

The result holds the *quantized* weights' exact values in float32 (or bf16), under the original tensor
names and layout — per-expert tensors the quantizer split out of a fused 3-D `experts.gate_up_proj` /
`experts.down_proj` are re-fused — so transformers loads it as the unquantized architecture. It is the
"dequantized model" accuracy comparisons run against (weights only: W4A4 activation quantization is not
represented). Works on ModelOpt and compressed-tensors checkpoints; the provenance file our quantizer writes
is only needed for re-fusing experts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from nvfp4_ext.errors import CheckpointError, ConfigError
from nvfp4_ext.format import dequantize_fp8, dequantize_nvfp4
from nvfp4_ext.quantize.io import (
    DTYPE_TO_TORCH,
    TORCH_TO_DTYPE,
    OutputTensor,
    ShardWriter,
    SourceTensor,
    atomic_output_dir,
    copy_aux_files,
    list_source_tensors,
    read_tensor,
    write_index,
)

__all__ = ["QuantizedReader", "dequantize_checkpoint"]

PROVENANCE_FILE = "nvfp4_ext_quantize.json"
_SCALE_SUFFIXES = (
    ".weight_scale",
    ".weight_scale_2",
    ".input_scale",
    ".weight_global_scale",
    ".input_global_scale",
    ".k_scale",
    ".v_scale",
)


class QuantizedReader:
    """Dequantized weights of a quantized checkpoint, one module at a time.

    Args:
        model_dir: ModelOpt or compressed-tensors checkpoint directory.
    Raises:
        CheckpointError: unreadable checkpoint or config.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        from nvfp4_ext.checkpoint.config import find_quant_config

        self.root = Path(model_dir)
        config = find_quant_config(self.root)
        self.convention = config.global_scale_convention if config is not None else "modelopt"
        self.tensors = {t.name: t for t in list_source_tensors(self.root)}

    def raw(self, name: str) -> torch.Tensor:
        """One stored tensor, as stored (read without mmap)."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise CheckpointError("tensor missing", tensor=name, file=str(self.root))
        return read_tensor(tensor)

    def module_kind(self, module: str) -> str:
        """ "nvfp4", "fp8" or "plain" for a module prefix with a `.weight` or `.weight_packed` tensor."""
        names = self.tensors
        if f"{module}.weight_packed" in names or f"{module}.weight_scale_2" in names:
            return "nvfp4"
        weight = names.get(f"{module}.weight")
        if weight is not None and weight.dtype == "U8" and f"{module}.weight_scale" in names:
            return "nvfp4"  # compressed-tensors-style global scale under a ModelOpt name, or vice versa
        if (
            weight is not None
            and weight.dtype in ("F8_E4M3", "F8_E5M2")
            and f"{module}.weight_scale" in names
        ):
            return "fp8"
        return "plain"

    def weight_shape(self, module: str) -> tuple[int, ...]:
        kind = self.module_kind(module)
        if kind == "nvfp4":
            packed = self.tensors.get(f"{module}.weight_packed") or self.tensors[f"{module}.weight"]
            return (*packed.shape[:-1], packed.shape[-1] * 2)
        return self.tensors[f"{module}.weight"].shape

    def weight(self, module: str) -> torch.Tensor:
        """The module's dequantized weight in float32."""
        kind = self.module_kind(module)
        if kind == "nvfp4":
            packed_name = (
                f"{module}.weight_packed" if f"{module}.weight_packed" in self.tensors else f"{module}.weight"
            )
            global_name = (
                f"{module}.weight_scale_2"
                if f"{module}.weight_scale_2" in self.tensors
                else f"{module}.weight_global_scale"
            )
            convention = "modelopt" if global_name.endswith("weight_scale_2") else "compressed_tensors"
            return dequantize_nvfp4(
                self.raw(packed_name),
                self.raw(f"{module}.weight_scale"),
                self.raw(global_name),
                convention=convention,
            )
        if kind == "fp8":
            return dequantize_fp8(self.raw(f"{module}.weight"), self.raw(f"{module}.weight_scale"))
        return self.raw(f"{module}.weight").float()

    def quantized_modules(self) -> list[str]:
        """Modules stored as NVFP4 or FP8, sorted."""
        modules = set()
        for name in self.tensors:
            for suffix in (".weight", ".weight_packed"):
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    if self.module_kind(module) != "plain":
                        modules.add(module)
        return sorted(modules)


def _provenance(root: Path) -> dict:
    path = root / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable provenance file: {exc}", file=str(path)) from None


_PER_EXPERT = re.compile(r"^(?P<parent>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def _architecture_fused_experts(reader: QuantizedReader) -> dict[str, dict]:
    """Fused-expert entries (the provenance file's format) for per-expert modules of other producers
    (ModelOpt, llm-compressor export `experts.E.gate_proj` ...) when transformers would not load them: the
    architecture's own parameters are fused 3-D `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj`
    [E, H, I] and transformers has no checkpoint conversion for the model type (Gemma 4, DiffusionGemma;
    Qwen3-MoE or DeepseekV3 per-expert tensors are converted by transformers itself, and engines read them
    per expert). Shapes are taken from the architecture instantiated on the meta device; {} when it cannot be
    (no config, architecture unknown to transformers)."""
    groups: dict[str, dict[int, set[str]]] = {}
    for module in reader.quantized_modules():
        match = _PER_EXPERT.match(module)
        if match:
            groups.setdefault(match["parent"], {}).setdefault(int(match["expert"]), set()).add(match["proj"])
    if not groups or not (reader.root / "config.json").is_file():
        return {}
    try:
        import transformers
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        config = transformers.AutoConfig.from_pretrained(reader.root)
        if get_checkpoint_conversion_mapping(config.model_type) is not None:
            return {}
        architecture = getattr(transformers, (config.architectures or [""])[0], None)
        if architecture is None:
            return {}
        with torch.device("meta"):
            model = architecture._from_config(config)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        return {}
    fused: dict[str, dict] = {}
    for parent, experts in groups.items():
        count = len(experts)
        if sorted(experts) != list(range(count)):
            continue
        for source, projections in ((f"{parent}.gate_up_proj", ("gate_proj", "up_proj")),
                                    (f"{parent}.down_proj", ("down_proj",))):  # fmt: skip
            if source not in shapes or any(not set(projections) <= experts[e] for e in range(count)):
                continue
            rows = sum(reader.weight_shape(f"{parent}.0.{proj}")[0] for proj in projections)
            stacked = (count, rows, reader.weight_shape(f"{parent}.0.{projections[0]}")[1])
            if shapes[source] != stacked:
                raise CheckpointError(
                    f"per-expert {', '.join(projections)} stack to {list(stacked)} but "
                    f"{config.architectures[0]} has {source} {list(shapes[source])}",
                    file=str(reader.root),
                )
            fused[source] = {"parent": parent, "projections": list(projections), "num_experts": count,
                             "shape": list(stacked)}  # fmt: skip
    return fused


def _jobs(reader: QuantizedReader, dtype: str) -> list[tuple[OutputTensor, Callable[[], torch.Tensor]]]:
    """(output tensor, producer) in name order; fused experts re-assembled from their per-expert modules."""
    fused = _provenance(reader.root).get("fused_experts", {}) or _architecture_fused_experts(reader)
    covered: set[str] = set()
    jobs: list[tuple[OutputTensor, Callable[[], torch.Tensor]]] = []
    for source, info in fused.items():
        modules = [
            f"{info['parent']}.{e}.{proj}" for e in range(info["num_experts"]) for proj in info["projections"]
        ]
        if not all(reader.module_kind(m) != "plain" for m in modules):
            continue

        def fuse(modules: list[str] = modules, info: dict = info) -> torch.Tensor:
            weights = [reader.weight(m) for m in modules]
            per_expert = len(info["projections"])
            stacked = [
                torch.cat(weights[e * per_expert : (e + 1) * per_expert]) for e in range(info["num_experts"])
            ]
            return torch.stack(stacked).to(DTYPE_TO_TORCH[dtype])

        jobs.append((OutputTensor(source, dtype, tuple(info["shape"])), fuse))
        covered.update(modules)
    quantized = set(reader.quantized_modules())
    for name, tensor in sorted(reader.tensors.items()):
        module = name.rsplit(".", 1)[0]
        if name.endswith(_SCALE_SUFFIXES):
            continue  # quantization and KV-cache scales have no place in an unquantized checkpoint
        if module in quantized and name.endswith((".weight", ".weight_packed")):
            if module in covered:
                continue
            jobs.append(
                (
                    OutputTensor(f"{module}.weight", dtype, tuple(reader.weight_shape(module))),
                    lambda m=module: reader.weight(m).to(DTYPE_TO_TORCH[dtype]),
                )
            )
        else:
            jobs.append(_copy_job(reader, tensor, dtype))
    return sorted(jobs, key=lambda job: job[0].name)


def _copy_job(
    reader: QuantizedReader, tensor: SourceTensor, dtype: str
) -> tuple[OutputTensor, Callable[[], torch.Tensor]]:
    floating = tensor.dtype in ("F32", "F16", "BF16")
    out_dtype = dtype if floating else tensor.dtype
    produce = (
        (lambda: reader.raw(tensor.name).to(DTYPE_TO_TORCH[dtype]))
        if floating
        else (lambda: reader.raw(tensor.name))
    )
    return OutputTensor(tensor.name, out_dtype, tensor.shape), produce


def dequantize_checkpoint(
    quantized_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write the dequantized weights of a quantized checkpoint as a plain HF checkpoint.

    Args:
        quantized_dir: ModelOpt or compressed-tensors checkpoint (ours re-fuses split experts).
        out_dir: output directory (must not exist unless `force`).
        dtype: torch.float32 or torch.bfloat16 for every floating tensor.
        force: replace an existing `out_dir`.
        max_shard_bytes: output shard size bound.
    Returns:
        `out_dir`.
    Raises:
        ConfigError: unsupported dtype or existing output.
        CheckpointError: unreadable input.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dequantize: dtype must be float32, bfloat16 or float16, got {dtype}")
    src, dst = Path(quantized_dir), Path(out_dir)
    reader = QuantizedReader(src)
    jobs = _jobs(reader, TORCH_TO_DTYPE[dtype])
    shards: list[list[tuple[OutputTensor, Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job[0].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job[0].nbytes
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    with atomic_output_dir(dst, force=force) as tmp:
        written = []
        for index, shard in enumerate(shards):
            name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            plan = [spec for spec, _ in shard]
            writer = ShardWriter(tmp / name, plan)
            try:
                for spec, produce in shard:
                    writer.write(spec.name, produce().contiguous())
            except BaseException:
                writer.abort()
                raise
            writer.close()
            written.append((name, plan))
        write_index(tmp, written)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_aux_files(src, tmp)
    return dst
