"""Header-only validation of an NVFP4 checkpoint's tensors, run before vLLM builds the model (no vLLM import).

Reads only safetensors headers (names, dtypes, shapes), so it is cheap even for large checkpoints. Every
module stored as NVFP4 (a uint8 weight or an e4m3 block scale) must carry its complete, shape-consistent set
of tensors; the error names the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvfp4_ext.checkpoint.config import QuantConfig
from nvfp4_ext.errors import CheckpointError
from nvfp4_ext.format import NVFP4_BLOCK_SIZE

__all__ = ["TensorInfo", "checkpoint_modules", "read_headers", "validate_checkpoint"]

TensorInfo = tuple[str, tuple[int, ...], str]  # (file, shape, safetensors dtype)

# Tensor suffixes of one NVFP4 module per checkpoint form.
_NAMES = {
    "modelopt": {
        "weight": "weight",
        "scale": "weight_scale",
        "global": "weight_scale_2",
        "input": "input_scale",
    },
    "compressed-tensors": {
        "weight": "weight_packed",
        "scale": "weight_scale",
        "global": "weight_global_scale",
        "input": "input_global_scale",
    },
}


def read_headers(model_dir: str | os.PathLike) -> dict[str, TensorInfo] | None:
    """name -> (file, shape, dtype) of every tensor in a local model directory; None if not a local dir."""
    root = Path(model_dir)
    if not root.is_dir():
        return None
    from safetensors import safe_open

    files = sorted(root.glob("*.safetensors"))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"unreadable weight index: {exc}", file=str(index)) from None
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise CheckpointError(
                f"shard(s) listed in the index are missing: {', '.join(missing)}", file=str(index)
            )
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_slice(name)
                    tensors[name] = (path.name, tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"not a readable safetensors file: {exc}", file=str(path)) from None
    return tensors


def checkpoint_modules(tensors: dict[str, TensorInfo]) -> frozenset[str]:
    """Module names (tensor names without their last component)."""
    return frozenset(name.rpartition(".")[0] for name in tensors)


def _expect(cond: bool, message: str, file: str, tensor: str) -> None:
    if not cond:
        raise CheckpointError(message, file=file, tensor=tensor)


def validate_checkpoint(model_dir: str | os.PathLike, quant: QuantConfig) -> dict[str, TensorInfo] | None:
    """Check every NVFP4 module's tensors: names, dtypes and shapes.

    Returns:
        the headers read, or None when `model_dir` is not a local directory (a hub id: vLLM downloads it
        later; then only the load-time checks run).
    Raises:
        CheckpointError: naming the file and tensor at fault.
    """
    tensors = read_headers(model_dir)
    if tensors is None:
        return None
    if not tensors:
        raise CheckpointError("no *.safetensors files", file=str(model_dir))
    names = _NAMES["compressed-tensors" if quant.producer == "compressed-tensors" else "modelopt"]
    modules = {
        name.rpartition(".")[0]
        for name, (_, _, dtype) in tensors.items()
        if name.endswith("." + names["scale"])
        and dtype == "F8_E4M3"
        or name.endswith("." + names["weight"])
        and dtype == "U8"
    }
    _check_unquantized_projections(tensors, modules, quant)
    for module in sorted(modules):
        weight, scale = f"{module}.{names['weight']}", f"{module}.{names['scale']}"
        glob, inp = f"{module}.{names['global']}", f"{module}.{names['input']}"
        for needed in (weight, scale, glob):
            _expect(
                needed in tensors,
                "missing: NVFP4 modules need weight, block scale and global scale",
                str(model_dir),
                needed,
            )
        wfile, wshape, wdtype = tensors[weight]
        sfile, sshape, sdtype = tensors[scale]
        gfile, gshape, gdtype = tensors[glob]
        _expect(
            wdtype == "U8" and len(wshape) == 2,
            f"expected packed uint8 [N, K/2], got {wdtype} {list(wshape)}",
            wfile,
            weight,
        )
        n, half_k = wshape
        _expect(sdtype == "F8_E4M3", f"expected float8_e4m3fn block scales, got {sdtype}", sfile, scale)
        expected = [n, 2 * half_k // NVFP4_BLOCK_SIZE]
        _expect(
            list(sshape) == expected and (2 * half_k) % NVFP4_BLOCK_SIZE == 0,
            f"expected shape {expected} (one scale per {NVFP4_BLOCK_SIZE} of the {2 * half_k} input features "
            f"of {weight} {list(wshape)}), got {list(sshape)}",
            sfile,
            scale,
        )
        _expect(
            gdtype == "F32" and int(_numel(gshape)) == 1,
            f"expected one float32 value, got {gdtype} {list(gshape)}",
            gfile,
            glob,
        )
        if quant.scheme_for(module) == "nvfp4":
            _expect(
                inp in tensors,
                "missing: W4A4 NVFP4 layers need the static activation scale",
                str(model_dir),
                inp,
            )
            ifile, ishape, idtype = tensors[inp]
            _expect(
                idtype == "F32" and int(_numel(ishape)) == 1,
                f"expected one float32 value, got {idtype} {list(ishape)}",
                ifile,
                inp,
            )
    return tensors


_FLOAT_DTYPES = ("BF16", "F16", "F32")
# Modules engines build as plain (never quantized) layers, whatever the exclude list says.
_ALWAYS_UNQUANTIZED = ("self_conditioning", "vision", "audio")


def _check_unquantized_projections(
    tensors: dict[str, TensorInfo], quantized: set[str], quant: QuantConfig
) -> None:
    """A `*_proj` linear stored in 16/32-bit floats must be excluded by the config, or vLLM would try to load
    it into NVFP4 parameters (and fail deep inside a worker)."""
    for name, (file, shape, dtype) in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or dtype not in _FLOAT_DTYPES or len(shape) != 2 or module in quantized:
            continue
        if not module.rpartition(".")[2].endswith("_proj") or any(p in module for p in _ALWAYS_UNQUANTIZED):
            continue
        scheme = quant.scheme_for(module)
        if scheme in ("nvfp4", "nvfp4_w4a16"):
            raise CheckpointError(
                f"stored as {dtype} {list(shape)}, but the quantization config makes it {scheme} (it is not "
                "in exclude_modules / ignore); add it there or re-export the checkpoint",
                file=file,
                tensor=name,
            )


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
