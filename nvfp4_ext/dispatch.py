"""Which implementation runs each layer type on a given device: one decision shared by every engine.

  * CUDA sm >= 100 with FlashInfer importable -> "flashinfer" (native FP4 tensor cores) for W4A4 NVFP4;
  * other CUDA (Ampere/Ada/Hopper, and W4A16 layers on Blackwell) -> "triton" (our weight-only kernels);
  * no CUDA (CPU) -> "torch" (the dequantize-on-the-fly references).
FP8 layers use torch `_scaled_mm` where FP8 tensor cores exist (sm >= 89) and our W8A16 Triton kernel below.
`NVFP4_EXT_BACKEND=torch|triton|flashinfer|emulated` forces a backend; read at call time, never at import.
"emulated" runs W4A4 layers (`nvfp4_linear`, `nvfp4_moe`) with FlashInfer's activation quantization and an
FP4 x FP4 GEMM in torch (`nvfp4_ext.kernels.fp4_emulation`), on any device; other layer kinds have no
activation quantization, so they get "torch" under it.
On a CPU, `NVFP4_EXT_BACKEND=triton` is accepted only with `TRITON_INTERPRET=1` (Triton's CPU interpreter runs
the kernels on CPU tensors: slow, for tests proving the CUDA-path glue without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

__all__ = [
    "Backend",
    "LayerKind",
    "describe_backends",
    "flashinfer_available",
    "select_backend",
    "triton_interpreter_enabled",
]

Backend = Literal["flashinfer", "triton", "torch", "scaled_mm", "emulated"]
LayerKind = Literal["nvfp4_linear", "nvfp4_w4a16_linear", "nvfp4_moe", "nvfp4_w4a16_moe", "fp8_linear"]
LAYER_KINDS: tuple[str, ...] = (
    "nvfp4_linear",
    "nvfp4_w4a16_linear",
    "nvfp4_moe",
    "nvfp4_w4a16_moe",
    "fp8_linear",
)
_FORCEABLE = ("flashinfer", "triton", "torch", "emulated")
W4A4_KINDS: tuple[str, ...] = ("nvfp4_linear", "nvfp4_moe")


def flashinfer_available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET`, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def select_backend(
    kind: LayerKind, capability: tuple[int, int] | None, *, has_flashinfer: bool | None = None
) -> Backend:
    """Pick the backend for one layer kind.

    Args:
        kind: the layer's scheme and role.
        capability: CUDA compute capability (major, minor), or None for CPU.
        has_flashinfer: whether FlashInfer is importable (default: probe).
    Raises:
        ValueError: unknown kind, an invalid NVFP4_EXT_BACKEND value, or a forced GPU backend on a CPU
            (except "triton" under TRITON_INTERPRET=1).
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {', '.join(LAYER_KINDS)}")
    forced = os.environ.get("NVFP4_EXT_BACKEND", "").strip()
    if forced:
        if forced not in _FORCEABLE:
            raise ValueError(f"NVFP4_EXT_BACKEND={forced!r} is not one of {', '.join(_FORCEABLE)}")
        if forced == "emulated":
            return "emulated" if kind in W4A4_KINDS else "torch"
        if capability is None and forced == "triton" and triton_interpreter_enabled():
            return "triton"  # CPU tensors through Triton's interpreter
        if capability is None and forced != "torch":
            hint = " (or TRITON_INTERPRET=1 for Triton's CPU interpreter)" if forced == "triton" else ""
            raise ValueError(f"NVFP4_EXT_BACKEND={forced} needs a CUDA GPU{hint}; this device is a CPU")
        return forced  # type: ignore[return-value]
    if capability is None:
        return "torch"
    if kind == "fp8_linear":
        return "scaled_mm" if capability >= (8, 9) else "triton"
    if has_flashinfer is None:
        has_flashinfer = flashinfer_available()
    native = kind in W4A4_KINDS  # W4A4: FP4 activations on FP4 tensor cores
    if native and capability >= (10, 0) and has_flashinfer:
        return "flashinfer"
    if capability >= (8, 0):
        return "triton"
    return "torch"


def describe_backends(
    capability: tuple[int, int] | None, *, has_flashinfer: bool | None = None
) -> dict[str, str]:
    """The backend of every layer kind for a device, e.g. for `nvfp4-ext inspect --gpu 9.0`."""
    return {k: select_backend(k, capability, has_flashinfer=has_flashinfer) for k in LAYER_KINDS}
