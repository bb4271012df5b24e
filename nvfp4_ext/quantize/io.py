"""Streaming safetensors I/O for the quantizer: header reading, planned shards, atomic output directories.

The quantizer knows every output tensor's name, dtype and shape before it computes any of them (they follow
from the input headers), so each output shard's header is written first and the tensor bytes are streamed
after it one tensor at a time: peak memory is a few tensors (the quantizer overlaps reading the next and
writing the previous with the current), never a shard or the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import signal
import struct
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_ext.errors import CheckpointError, ConfigError

__all__ = [
    "DTYPE_TO_TORCH",
    "TORCH_TO_DTYPE",
    "OutputTensor",
    "ShardWriter",
    "SourceTensor",
    "atomic_output_dir",
    "check_output_dir",
    "copy_aux_files",
    "list_source_tensors",
    "map_tensor",
    "read_safetensors_header",
    "read_tensor",
    "write_index",
]

DTYPE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_TO_TORCH.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPE_TO_TORCH.items()}
_MAX_HEADER = 100 * 1024 * 1024
# Files a quantized checkpoint does not inherit from its source (rewritten, or meaningless after quantizing).
_NOT_COPIED = {
    "config.json",
    "hf_quant_config.json",
    "model.safetensors.index.json",
    "nvfp4_ext_quantize.json",
}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of an input checkpoint, as its safetensors header describes it."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute file offset of the tensor's bytes

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def read_tensor(tensor: SourceTensor) -> torch.Tensor:
    """Read one tensor with plain file reads (no mmap), so only its own bytes count towards RSS.

    Raises:
        CheckpointError: the file is shorter than its header says.
    """
    buffer = torch.empty(tensor.nbytes, dtype=torch.uint8)
    try:
        with tensor.file.open("rb") as f:
            f.seek(tensor.offset)
            got = f.readinto(memoryview(buffer.numpy())) if tensor.nbytes else 0
    except OSError as exc:
        raise CheckpointError(
            f"cannot read tensor data: {exc}", file=str(tensor.file), tensor=tensor.name
        ) from None
    if got != tensor.nbytes:
        raise CheckpointError(
            f"truncated data: {got} of {tensor.nbytes} bytes", file=str(tensor.file), tensor=tensor.name
        )
    return buffer.view(DTYPE_TO_TORCH[tensor.dtype]).reshape(tensor.shape)


def map_tensor(tensor: SourceTensor) -> torch.Tensor:
    """Map one tensor's bytes read-only from the page cache (no copy), pre-faulted in the calling thread.

    The mapping covers only this tensor and is released with the returned tensor, so, as with
    `read_tensor`, only its own bytes count towards RSS. The tensor must not be written to.

    Raises:
        CheckpointError: the file is shorter than its header says, or cannot be mapped.
    """
    if tensor.nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # empty, or no POSIX mmap (Windows)
        return read_tensor(tensor)
    start = tensor.offset - tensor.offset % mmap.ALLOCATIONGRANULARITY
    try:
        with tensor.file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if tensor.offset + tensor.nbytes > size:
                raise CheckpointError(
                    f"truncated data: the tensor ends at byte {tensor.offset + tensor.nbytes}, the file has "
                    f"{size}",
                    file=str(tensor.file),
                    tensor=tensor.name,
                )
            mapped = mmap.mmap(
                f.fileno(),
                tensor.offset + tensor.nbytes - start,
                flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0),
                prot=mmap.PROT_READ,
                offset=start,
            )
    except OSError as exc:
        raise CheckpointError(
            f"cannot map tensor data: {exc}", file=str(tensor.file), tensor=tensor.name
        ) from None
    with warnings.catch_warnings():  # read-only buffer: torch warns that writes would be undefined
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=tensor.nbytes, offset=tensor.offset - start)
    return flat.view(DTYPE_TO_TORCH[tensor.dtype]).reshape(tensor.shape)


@dataclass(frozen=True)
class OutputTensor:
    """A planned output tensor: name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors file's JSON header (without `__metadata__`); adds each tensor's absolute
    `data_start` offset.

    Raises:
        CheckpointError: truncated file, bad header length or JSON, unknown dtype (names the file/tensor).
    """
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError("truncated safetensors file (no header)", file=str(path))
            (length,) = struct.unpack("<Q", raw_len)
            if length > _MAX_HEADER:
                raise CheckpointError(f"implausible safetensors header length {length}", file=str(path))
            header = json.loads(f.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read safetensors header: {exc}", file=str(path)) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", file=str(path))
    header.pop("__metadata__", None)
    size = path.stat().st_size
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPE_TO_TORCH:
            dtype = info.get("dtype") if isinstance(info, dict) else info
            raise CheckpointError(f"unsupported or missing dtype {dtype!r}", file=str(path), tensor=name)
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list)):
            raise CheckpointError("malformed header entry (shape/data_offsets)", file=str(path), tensor=name)
        expected = math.prod(shape) * _ITEMSIZE[info["dtype"]]
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(
                f"data_offsets span {offsets[1] - offsets[0]} bytes, shape {shape} needs {expected}",
                file=str(path),
                tensor=name,
            )
        info["data_start"] = 8 + length + offsets[0]
        if 8 + length + offsets[1] > size:
            raise CheckpointError(
                f"truncated safetensors file: tensor data ends at byte {8 + length + offsets[1]}, "
                f"the file has {size} bytes",
                file=str(path),
                tensor=name,
            )
    return header


def list_source_tensors(model_dir: Path) -> list[SourceTensor]:
    """Every tensor of a checkpoint directory (sharded with an index, or loose *.safetensors files).

    Raises:
        CheckpointError: no safetensors files, an index naming a missing shard, or duplicate tensor names.
    """
    if not model_dir.is_dir():
        raise CheckpointError("model directory not found", file=str(model_dir))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"unreadable index ({exc})", file=str(index)) from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model_dir / name).is_file():
                raise CheckpointError(f"shard {name} listed in the index is missing", file=str(index))
        paths = [model_dir / name for name in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(
            "no *.safetensors files (only safetensors checkpoints are supported)", file=str(model_dir)
        )
    tensors: dict[str, SourceTensor] = {}
    for path in paths:
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor appears in both {tensors[name].file.name} and {path.name}", tensor=name
                )
            tensors[name] = SourceTensor(name, path, info["dtype"], tuple(info["shape"]), info["data_start"])
    return list(tensors.values())


class ShardWriter:
    """Write one safetensors file whose tensors are all known up front, one tensor at a time.

    The header (with every offset) is written on open; `write` must then be called for each planned tensor
    in plan order with a tensor of exactly the planned dtype and shape.
    """

    def __init__(self, path: Path, plan: list[OutputTensor], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.plan = plan
        self._next = 0
        header: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for spec in plan:
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * ((8 - len(encoded) % 8) % 8)
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the bytes of the next planned tensor."""
        if self._next >= len(self.plan):
            raise RuntimeError(f"{self.path.name}: tensor {name} was not planned")
        spec = self.plan[self._next]
        got = (name, TORCH_TO_DTYPE.get(tensor.dtype), tuple(tensor.shape))
        if got != (spec.name, spec.dtype, spec.shape):
            raise RuntimeError(f"{self.path.name}: planned {spec}, got {got}")
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def abort(self) -> None:
        """Close without the completeness check (the caller is unwinding an error)."""
        self._file.close()

    def close(self) -> None:
        """Flush and close; raises if planned tensors were never written."""
        self._file.close()
        if self._next != len(self.plan):
            missing = self.plan[self._next].name
            raise RuntimeError(
                f"{self.path.name}: closed after {self._next}/{len(self.plan)} tensors ({missing} missing)"
            )


def write_index(out_dir: Path, shards: list[tuple[str, list[OutputTensor]]]) -> None:
    """Write model.safetensors.index.json for (file name, tensors) shards."""
    weight_map = {spec.name: file for file, plan in shards for spec in plan}
    total = sum(spec.nbytes for _, plan in shards for spec in plan)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config and other non-weight files (no weights, no rewritten configs)."""
    copied = []
    for item in sorted(src.iterdir()):
        if (
            item.name in _NOT_COPIED
            or item.suffix in (".safetensors", ".bin", ".pt", ".pth")
            or item.name.startswith(".")
        ):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
        copied.append(item.name)
    return copied


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def check_output_dir(dst: Path, *, force: bool) -> None:
    """Refuse an output path that exists, unless `force` and it is a directory (never replace a file).

    Raises:
        ConfigError: naming `dst`.
    """
    if (dst.exists() or dst.is_symlink()) and not dst.is_dir():
        raise ConfigError(
            f"output {dst} exists and is not a directory: refusing to replace it, even with --force"
        )
    if dst.exists() and not force:
        raise ConfigError(f"output directory {dst} already exists (use --force to overwrite it)")


@contextlib.contextmanager
def atomic_output_dir(dst: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `dst`; rename it to `dst` only if the block completes.

    Any exception (including KeyboardInterrupt, and SIGTERM which is turned into one while the block runs in
    the main thread) removes the temporary directory and leaves `dst` untouched.

    Raises:
        ConfigError: `dst` exists and `force` is false, or `dst`'s parent is not a directory.
    """
    dst = dst.absolute()
    check_output_dir(dst, force=force)
    if not dst.parent.is_dir():
        raise ConfigError(f"parent directory of the output {dst} does not exist")
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield tmp
        if dst.exists():
            trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(dst, trash)
            os.rename(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
