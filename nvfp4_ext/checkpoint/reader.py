"""Lazy access to a model directory's tensors: one `model.safetensors`, or shards behind an index json.

Opening a checkpoint reads the quantization config and every file's header, nothing else; `get` reads
one tensor's bytes. `modules()` resolves each linear/expert module's scheme and tensor names (see
`nvfp4_ext.checkpoint.modules`), and `dequantized_weight` turns any scheme back into float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from nvfp4_ext.checkpoint.config import QuantConfig, find_quant_config
from nvfp4_ext.checkpoint.safetensors_file import SafetensorsFile, TensorInfo
from nvfp4_ext.errors import CheckpointError
from nvfp4_ext.format import dequantize_fp8, dequantize_nvfp4

__all__ = ["INDEX_FILE", "SINGLE_FILE", "Checkpoint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """A model directory opened for lazy, validated reading.

    Use `Checkpoint.open(model_dir)`. Attributes: `root` (Path), `quant_config` (QuantConfig or None for an
    unquantized model), `files` (path -> SafetensorsFile).
    """

    def __init__(
        self, root: Path, quant_config: QuantConfig | None, files: dict[str, SafetensorsFile]
    ) -> None:
        self.root = root
        self.quant_config = quant_config
        self.files = files
        self._where: dict[str, SafetensorsFile] = {}
        for shard in files.values():
            for name in shard.tensors:
                if name in self._where:
                    raise CheckpointError(
                        f"tensor stored twice, also in {self._where[name].path}", file=shard.path, tensor=name
                    )
                self._where[name] = shard
        self._modules: list | None = None
        self._module_index: dict = {}

    @classmethod
    def open(cls, model_dir: str | os.PathLike) -> Checkpoint:
        """Open a model directory: quantization config plus safetensors headers (no tensor data).

        Raises:
            CheckpointError: missing directory or files, bad config, corrupt/truncated headers, bad index.
        """
        root = Path(model_dir)
        quant_config = find_quant_config(root)  # also checks that the directory exists
        index_path = root / INDEX_FILE
        if index_path.is_file():
            files = _open_indexed(index_path)
        elif (root / SINGLE_FILE).is_file():
            files = {str(root / SINGLE_FILE): SafetensorsFile(root / SINGLE_FILE)}
        else:
            paths = sorted(root.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file", file=str(root))
            files = {str(p): SafetensorsFile(p) for p in paths}
        return cls(root, quant_config, files)

    # ------------------------------------------------------------------------------------------ tensors
    def tensor_names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._where)

    def has(self, name: str) -> bool:
        """Whether the checkpoint stores a tensor of this name."""
        return name in self._where

    def tensor_info(self, name: str) -> TensorInfo:
        """dtype, shape and file of a tensor, from headers only.

        Raises:
            CheckpointError: no such tensor (names the tensor and the directory).
        """
        shard = self._where.get(name)
        if shard is None:
            raise CheckpointError("tensor not found in the checkpoint", file=str(self.root), tensor=name)
        return shard.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only its bytes)."""
        self.tensor_info(name)
        return self._where[name].read(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows [start, stop) of a tensor's first dimension (e.g. one expert of a 3-D tensor)."""
        self.tensor_info(name)
        return self._where[name].read(name, start, stop)

    def total_bytes(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(info.nbytes for shard in self.files.values() for info in shard.tensors.values())

    # ------------------------------------------------------------------------------------------ modules
    def modules(self) -> list:
        """Resolved per-module records (`ModuleRecord`), sorted by name; cached.

        Raises:
            CheckpointError: config and tensors disagree, scales missing or of the wrong dtype/shape.
        """
        if self._modules is None:
            from nvfp4_ext.checkpoint.modules import resolve_modules

            self._modules = resolve_modules(self)
            self._module_index = {record.name: record for record in self._modules}
        return self._modules

    def module(self, name: str):
        """The record of one module (HF name without `.weight`)."""
        self.modules()
        record = self._module_index.get(name)
        if record is not None:
            return record
        raise CheckpointError(
            "no such linear/expert module in the checkpoint", file=str(self.root), tensor=name
        )

    def iter_expert_weights(self, module: str) -> Iterator[torch.Tensor]:
        """Dequantized float32 weights of a 3-D module one expert at a time (bounded memory)."""
        record = self.module(module)
        for expert in range(record.shape[0] if len(record.shape) == 3 else 1):
            yield self._dequantize(record, expert)

    def dequantized_weight(self, module: str) -> torch.Tensor:
        """The float32 weight [N, K] or [E, N, K] of a module, whatever its scheme."""
        record = self.module(module)
        if len(record.shape) == 3:
            return torch.stack(list(self.iter_expert_weights(module)))
        return self._dequantize(record, None)

    def _dequantize(self, record, expert: int | None) -> torch.Tensor:
        def load(role: str) -> torch.Tensor | None:
            name = record.tensors.get(role)
            if name is None:
                return None
            info = self.tensor_info(name)
            if (
                expert is not None
                and len(info.shape) >= 1
                and info.shape[0] == record.shape[0]
                and info.numel > 1
            ):
                return self.get_rows(name, expert, expert + 1)[0]
            return self.get(name)

        weight = load("weight")
        if record.scheme == "unquantized":
            return weight.float()
        scale = load("weight_scale")
        if record.scheme.startswith("nvfp4"):
            convention = self.quant_config.global_scale_convention if self.quant_config else "modelopt"
            global_scale = load("weight_global").float()
            if global_scale.numel() == 1:
                global_scale = global_scale.reshape(())
            return dequantize_nvfp4(weight, scale, global_scale, convention=convention)
        if scale.numel() == 1:
            scale = scale.reshape(())
        return dequantize_fp8(weight, scale.float())


def _open_indexed(index_path: Path) -> dict[str, SafetensorsFile]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable index json: {exc}", file=str(index_path)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("index json has no weight_map object", file=str(index_path))
    files: dict[str, SafetensorsFile] = {}
    for tensor, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or "/" in shard_name or "\\" in shard_name:
            raise CheckpointError(
                f"weight_map entry is not a shard file name: {shard_name!r}", file=str(index_path)
            )
        path = index_path.parent / shard_name
        key = str(path)
        if key not in files:
            if not path.is_file():
                raise CheckpointError(
                    f"weight_map points to missing shard {shard_name}", file=str(index_path), tensor=tensor
                )
            files[key] = SafetensorsFile(path)
        if tensor not in files[key].tensors:
            raise CheckpointError(
                f"weight_map maps the tensor to {shard_name}, which does not contain it",
                file=str(index_path),
                tensor=tensor,
            )
    return files
