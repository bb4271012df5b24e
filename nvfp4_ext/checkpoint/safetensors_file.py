"""A strict, lazy reader of one `.safetensors` file: header-only metadata and byte-range tensor reads.

The safetensors layout is `u64 little-endian header length | JSON header | data`. We parse the header
ourselves so that a truncated or corrupt file becomes a `CheckpointError` naming the file (and tensor)
instead of an exception from inside the safetensors extension, and so that answering a question about
one tensor reads only that tensor's bytes (a seek and a read; never the whole shard).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_ext.errors import CheckpointError

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsFile", "TensorInfo"]

# safetensors dtype code -> torch dtype (all little-endian, as safetensors requires).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the file header alone.

    Attributes:
        name: tensor name.
        dtype: safetensors dtype code ("U8", "F8_E4M3", "F32", "BF16", ...).
        shape: stored shape.
        file: path of the file holding it.
        offset: absolute byte offset of its data in the file.
        nbytes: size of its data.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored data."""
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


class SafetensorsFile:
    """Header of one safetensors file, validated against the file size; reads tensors on demand.

    Raises (from the constructor):
        CheckpointError: missing, truncated or corrupt file (names the file and, if known, the tensor).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse_header()

    def _fail(self, message: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(message, file=self.path, tensor=tensor)

    def _parse_header(self) -> None:
        try:
            size = Path(self.path).stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._fail(
                        f"truncated safetensors file: {size} bytes, shorter than the 8-byte header size"
                    )
                header_len = int.from_bytes(prefix, "little")
                if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                    raise self._fail(
                        f"truncated or corrupt safetensors file: header claims {header_len} bytes, the file "
                        f"has {size} bytes"
                    )
                raw = f.read(header_len)
        except FileNotFoundError:
            raise self._fail("safetensors file not found") from None
        except OSError as exc:
            raise self._fail(f"cannot read safetensors file: {exc.strerror or exc}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._fail("corrupt safetensors file: the header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt safetensors file: the header is not a JSON object")
        data_start = 8 + header_len
        metadata = header.pop("__metadata__", None) or {}
        self.metadata = metadata if isinstance(metadata, dict) else {}
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry, data_start, size)

    def _parse_entry(self, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._fail("corrupt safetensors header entry (needs dtype, shape, data_offsets)", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise self._fail(f"unsupported safetensors dtype {dtype!r}", name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise self._fail(f"corrupt safetensors header: bad shape {shape!r}", name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(f"corrupt safetensors header: bad data_offsets {offsets!r}", name)
        itemsize = SAFETENSORS_DTYPES[dtype].itemsize
        expected = math.prod(shape) * itemsize
        nbytes = offsets[1] - offsets[0]
        if nbytes != expected:
            raise self._fail(
                f"corrupt safetensors header: {dtype} {shape} needs {expected} bytes, offsets span {nbytes}",
                name,
            )
        if data_start + offsets[1] > size:
            raise self._fail(
                f"truncated safetensors file: tensor data ends at byte {data_start + offsets[1]}, the file "
                f"has {size} bytes",
                name,
            )
        return TensorInfo(name, dtype, tuple(shape), self.path, data_start + offsets[0], nbytes)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Read a tensor, or rows [start, stop) of its first dimension, with one seek and one read.

        Raises:
            CheckpointError: the tensor is not in this file, or the file changed/shrank since it was opened.
        """
        info = self.tensors.get(name)
        if info is None:
            raise self._fail("tensor not found in this file", name)
        if not info.shape:
            start, stop, row_shape = 0, 1, ()
        else:
            stop = info.shape[0] if stop is None else min(stop, info.shape[0])
            start = max(0, min(start, stop))
            row_shape = info.shape[1:]
        row_bytes = math.prod(row_shape) * info.torch_dtype.itemsize
        count = (stop - start) * row_bytes
        shape = row_shape if not info.shape else (stop - start, *row_shape)
        if count == 0:
            return torch.empty(shape, dtype=info.torch_dtype)
        try:
            with open(self.path, "rb") as f:
                f.seek(info.offset + start * row_bytes)
                data = f.read(count)
        except OSError as exc:
            raise self._fail(f"cannot read tensor data: {exc.strerror or exc}", name) from None
        if len(data) != count:
            raise self._fail(
                f"truncated safetensors file: read {len(data)} of {count} bytes of tensor data", name
            )
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return flat.view(info.torch_dtype).reshape(shape)
