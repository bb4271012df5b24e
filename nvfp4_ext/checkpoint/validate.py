"""Checkpoint validation: each problem becomes one `CheckpointError` naming the file, tensor and fault.

Three levels, all streaming (a question about one tensor reads at most that tensor, experts one at a time):
  * `check_headers(ckpt, record)`: presence, dtype and shape of a module's tensors, from headers only
    (run for every module by `Checkpoint.modules()`);
  * `check_fused(ckpt, records)`: shards of one fused module (q/k/v, gate/up) share a scheme;
  * `check_values(ckpt, record)`: global, block and input scales are finite and positive (reads scales only).
`validate_checkpoint(model_dir)` runs them all.
"""

from __future__ import annotations

import os

import torch

from nvfp4_ext.checkpoint.config import NVFP4_SCHEMES
from nvfp4_ext.checkpoint.modules import ModuleRecord, expected_block_scale_shape, expected_fp8_scale_shapes
from nvfp4_ext.checkpoint.names import group_fused
from nvfp4_ext.checkpoint.reader import Checkpoint
from nvfp4_ext.errors import CheckpointError
from nvfp4_ext.format import NVFP4_BLOCK_SIZE

__all__ = ["check_fused", "check_headers", "check_values", "validate_checkpoint"]

_SCALE_FLOATS = ("F32", "BF16", "F16")
_GLOBAL_NAMES = {"modelopt": "weight_scale_2", "compressed_tensors": "weight_global_scale"}
_INPUT_NAMES = {"modelopt": "input_scale", "compressed_tensors": "input_global_scale"}


def _fail(ckpt: Checkpoint, tensor: str, message: str) -> CheckpointError:
    file = ckpt.tensor_info(tensor).file if ckpt.has(tensor) else None
    return CheckpointError(message, file=file, tensor=tensor)


def _shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    return ckpt.tensor_info(name).shape


def _companion_name(record: ModuleRecord, suffix: str) -> str:
    weight = record.tensors["weight"]
    if weight == record.name:  # bare parameter
        return f"{record.name}_{suffix}"
    return f"{record.name}.{suffix}"


def check_headers(ckpt: Checkpoint, record: ModuleRecord) -> None:
    """Presence, dtype and shape of a module's tensors (headers only).

    Raises:
        CheckpointError: names the tensor and what is wrong.
    """
    if record.stored_scheme in NVFP4_SCHEMES:
        _check_nvfp4_headers(ckpt, record)
    elif record.stored_scheme.startswith("fp8"):
        _check_fp8_headers(ckpt, record)


def _check_convention(ckpt: Checkpoint, record: ModuleRecord) -> str:
    """The global-scale convention of the config, checked against the tensor names actually used."""
    cfg = ckpt.quant_config
    convention = cfg.global_scale_convention if cfg else "modelopt"
    other = "compressed_tensors" if convention == "modelopt" else "modelopt"
    for role, names in (("weight_global", _GLOBAL_NAMES), ("input_global", _INPUT_NAMES)):
        name = record.tensors.get(role)
        if name is not None and name.endswith(names[other]) and not name.endswith(names[convention]):
            raise _fail(
                ckpt,
                name,
                f"{names[other]} is the {other} name but {cfg.source if cfg else 'the checkpoint'} is a "
                f"{convention} checkpoint (expects {names[convention]}); the two store reciprocal scales",
            )
    return convention


def _check_nvfp4_headers(ckpt: Checkpoint, record: ModuleRecord) -> None:
    weight = record.tensors["weight"]
    packed = _shape(ckpt, weight)
    convention = _check_convention(ckpt, record)
    k = record.shape[-1]
    if k % NVFP4_BLOCK_SIZE:
        raise _fail(
            ckpt,
            weight,
            f"K = {k} (packed weight {list(packed)} = [N, K/2]) is not a multiple of {NVFP4_BLOCK_SIZE}",
        )
    scale = record.tensors.get("weight_scale")
    if scale is None:
        raise _fail(
            ckpt,
            weight,
            f"missing {_companion_name(record, 'weight_scale')}: a packed NVFP4 weight needs float8_e4m3fn "
            f"block scales {list(expected_block_scale_shape(record))}",
        )
    info = ckpt.tensor_info(scale)
    if info.dtype != "F8_E4M3":
        raise _fail(
            ckpt, scale, f"wrong dtype {info.dtype} for NVFP4 block scales, expected F8_E4M3 (float8_e4m3fn)"
        )
    expected = expected_block_scale_shape(record)
    if info.shape != expected:
        raise _fail(
            ckpt,
            scale,
            f"wrong shape {list(info.shape)} for NVFP4 block scales, expected [N, K/16] = {list(expected)} "
            f"for packed weight {list(packed)}",
        )
    global_name = record.tensors.get("weight_global")
    if global_name is None:
        raise _fail(
            ckpt,
            weight,
            f"missing {_companion_name(record, _GLOBAL_NAMES[convention])}: NVFP4 needs a global scale",
        )
    _check_per_tensor_scale(ckpt, record, global_name, per_row=True)
    input_name = record.tensors.get("input_global")
    if input_name is not None:
        _check_per_tensor_scale(ckpt, record, input_name, per_row=False)


def _check_per_tensor_scale(ckpt: Checkpoint, record: ModuleRecord, name: str, *, per_row: bool) -> None:
    info = ckpt.tensor_info(name)
    if info.dtype != "F32":
        raise _fail(ckpt, name, f"wrong dtype {info.dtype} for a global scale, expected F32")
    lead, n = record.shape[:-2], record.shape[-2]
    allowed = {(), (1,), lead, (*lead, 1)}
    if per_row:
        allowed.add((*lead, n))  # per-output-row global scales (fused shards kept exact)
    if info.shape not in allowed:
        want = " or ".join(str(list(s)) for s in sorted(allowed, key=len))
        raise _fail(ckpt, name, f"wrong shape {list(info.shape)} for a global scale, expected {want}")


def _check_fp8_headers(ckpt: Checkpoint, record: ModuleRecord) -> None:
    weight = record.tensors["weight"]
    scale = record.tensors.get("weight_scale")
    if scale is None:
        raise _fail(
            ckpt, weight, f"missing {_companion_name(record, 'weight_scale')}: an FP8 weight needs its scale"
        )
    info = ckpt.tensor_info(scale)
    if info.dtype not in _SCALE_FLOATS:
        raise _fail(ckpt, scale, f"wrong dtype {info.dtype} for an FP8 weight scale, expected F32")
    allowed = expected_fp8_scale_shapes(record)
    if info.shape not in allowed:
        want = " or ".join(str(list(s)) for s in allowed)
        raise _fail(
            ckpt, scale, f"wrong shape {list(info.shape)} for {record.scheme} weight scales, expected {want}"
        )


def check_fused(ckpt: Checkpoint, records: list[ModuleRecord]) -> None:
    """Shards of one fused module (q/k/v -> qkv_proj, gate/up -> gate_up_proj) must share one scheme.

    Raises:
        CheckpointError: names the disagreeing shard tensors.
    """
    by_name = {r.name: r for r in records}
    for fused, shards in group_fused(list(by_name)).items():
        schemes = {s: by_name[s].scheme for s in shards}
        if len(set(schemes.values())) > 1:
            detail = ", ".join(f"{s.rsplit('.', 1)[-1]}={v}" for s, v in schemes.items())
            first = by_name[shards[0]].tensors["weight"]
            raise _fail(
                ckpt,
                first,
                f"shards of fused module {fused} have different schemes ({detail}); engines load one layer",
            )


def _check_finite_positive(ckpt: Checkpoint, name: str, values: torch.Tensor, what: str) -> None:
    v = values.float()
    if torch.isnan(v).any():
        raise _fail(ckpt, name, f"{what} contains NaN ({int(torch.isnan(v).sum())} of {v.numel()} values)")
    if torch.isinf(v).any():
        raise _fail(ckpt, name, f"{what} contains inf ({int(torch.isinf(v).sum())} of {v.numel()} values)")
    if (v < 0).any():
        raise _fail(ckpt, name, f"{what} is negative (min {v.min().item():.4g})")


def check_values(ckpt: Checkpoint, record: ModuleRecord) -> None:
    """Scales are finite and positive; reads only the scale tensors (block scales one expert at a time).

    Raises:
        CheckpointError: NaN/inf/negative (or zero global) scale, naming the tensor.
    """
    for role in ("weight_global", "input_global"):
        name = record.tensors.get(role)
        if name is None:
            continue
        values = ckpt.get(name)
        what = "global scale" if role == "weight_global" else "input scale"
        _check_finite_positive(ckpt, name, values, what)
        if (values.float() == 0).any():
            raise _fail(ckpt, name, f"{what} is zero")
    scale = record.tensors.get("weight_scale")
    if scale is None or record.scheme == "unquantized":
        return
    what = "block scales" if record.scheme in NVFP4_SCHEMES else "weight scale"
    shape = _shape(ckpt, scale)
    rows = shape[0] if len(shape) == 3 else 1
    for expert in range(rows):
        values = ckpt.get_rows(scale, expert, expert + 1) if len(shape) == 3 else ckpt.get(scale)
        _check_finite_positive(ckpt, scale, values, what)
        if record.scheme not in NVFP4_SCHEMES and (values.float() == 0).any():
            raise _fail(ckpt, scale, f"{what} is zero")


def validate_checkpoint(model_dir: str | os.PathLike | Checkpoint, *, values: bool = True) -> Checkpoint:
    """Open (if needed) and fully validate a checkpoint; return it.

    Args:
        model_dir: a model directory or an opened `Checkpoint`.
        values: also read the scale tensors and check them (cheap: scales are 1/16 of the weights).
    Raises:
        CheckpointError: the first problem found.
    """
    ckpt = model_dir if isinstance(model_dir, Checkpoint) else Checkpoint.open(model_dir)
    records = ckpt.modules()  # runs check_headers on each module
    check_fused(ckpt, records)
    if values:
        for record in records:
            check_values(ckpt, record)
    return ckpt
