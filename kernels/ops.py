"""Public entry points of `nvfp4_ext.kernels`: run the Triton kernel or the pure-torch reference per call.

`backend="auto"` runs the reference on CPU tensors and, on CUDA, follows `nvfp4_ext.dispatch.select_backend`
(our Triton kernels on sm_80+, `torch._scaled_mm` for FP8 layers on sm_89+). `backend="triton"` forces the
kernel; with `TRITON_INTERPRET=1` it also accepts CPU tensors, which is how the interpreter tests run it.
Triton is imported only when a Triton backend actually runs, so this module loads on any machine.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Literal

import torch

from nvfp4_ext.dispatch import LayerKind, select_backend
from nvfp4_ext.format import F8E4M3_MAX

from .reference import Activation, fp8_gemm_ref, nvfp4_gemm_ref, nvfp4_moe_ref

__all__ = [
    "BackendChoice",
    "Fp8BackendChoice",
    "marlin_decode_mode",
    "marlin_decode_mode_for",
    "marlin_decode_selected",
    "fp8_gemm",
    "fp8_path",
    "host_may_read_values",
    "interpreter_enabled",
    "nvfp4_gemm",
    "nvfp4_moe",
    "scaled_mm_unsupported",
]

logger = logging.getLogger("nvfp4_ext")

BackendChoice = Literal["auto", "triton", "torch"]
Fp8BackendChoice = Literal["auto", "triton", "torch", "scaled_mm"]


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read at call time, as Triton itself does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def marlin_decode_selected(x: torch.Tensor) -> bool:
    """Whether the NVFP4 kernels decode weights with the Marlin-class PTX (`nvfp4_words.WORD_DECODE_ASM`).

    The default for bf16 activations on CUDA (1.5 SASS instructions per weight for the bit decode; 3.3-3.6
    per weight in the whole sm_90a K loop of the decode tiles). The portable decode runs instead for
    fp16/fp32 activations, under the interpreter (which cannot run PTX) and when
    `NVFP4_EXT_MARLIN_DECODE=0`. Read at call time.
    """
    disabled = os.environ.get("NVFP4_EXT_MARLIN_DECODE", "1") in ("", "0")
    return not disabled and x.is_cuda and x.dtype == torch.bfloat16 and not interpreter_enabled()


# Values of the kernels' MARLIN_DECODE constexpr: which decode `nvfp4_tile.load_nvfp4_tile_pair` runs.
MARLIN_DECODE_OFF = 0  # portable decode
MARLIN_DECODE_PTX = 1  # `nvfp4_words.WORD_DECODE_ASM` (sm_80+: shf, lop3, fma.rn.bf16x2)


def marlin_decode_mode_for(capability: int) -> int:
    """The PTX decode's MARLIN_DECODE value on compute capability `capability` (e.g. 90): one flavour for
    every target since the block scales became integer codes (`nvfp4_words`)."""
    del capability
    return MARLIN_DECODE_PTX


def marlin_decode_mode(x: torch.Tensor) -> int:
    """MARLIN_DECODE for a launch on `x`: `MARLIN_DECODE_OFF` unless `marlin_decode_selected(x)` (no device
    query, no sync: safe under CUDA-graph capture)."""
    return MARLIN_DECODE_PTX if marlin_decode_selected(x) else MARLIN_DECODE_OFF


def host_may_read_values(t: torch.Tensor) -> bool:
    """Whether host code may read `t`'s values now (a sync on CUDA): not while a CUDA graph is being
    captured (illegal there), nor while torch.compile traces or fake tensors stand in (no values exist).

    Only input validation may depend on this; the computation itself never reads device values.
    """
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t) or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _resolve(backend: str, kind: LayerKind, device: torch.device, allowed: tuple[str, ...]) -> str:
    """The concrete backend for one call; raises instead of silently falling back."""
    if backend not in allowed:
        raise ValueError(f"expected backend in {allowed}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        chosen = select_backend(kind, torch.cuda.get_device_capability(device))
        # Weight-only kernels have no FlashInfer variant: a forced "flashinfer" still means our Triton kernel.
        return "triton" if chosen == "flashinfer" else chosen
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 before "
            "importing triton to run the Triton kernels on CPU, or use backend='torch'"
        )
    return backend


def nvfp4_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: BackendChoice = "auto",
    config: Any = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T (+ bias) for a weight-only (W4A16) NVFP4 linear layer.

    Args:
        x: [M, K] fp16/bf16/fp32 activations.
        weight: uint8 [N, K/2]; weight_scale: float8_e4m3fn [N, K/16].
        global_scale: float32 multiplier, 0-d or [N] (per output row).
        bias: optional [N].
        backend: "auto", "triton" or "torch" (the reference).
        config: a `nvfp4_gemm_kernel.GemmConfig` forcing the Triton launch configuration.
    Returns:
        [M, N] in x.dtype.
    """
    chosen = _resolve(backend, "nvfp4_w4a16_linear", x.device, ("auto", "triton", "torch"))
    if chosen == "torch":
        return nvfp4_gemm_ref(x, weight, weight_scale, global_scale, bias)
    from .nvfp4_gemm_kernel import nvfp4_gemm_triton

    return nvfp4_gemm_triton(x, weight, weight_scale, global_scale, bias, config=config)


def nvfp4_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_global: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Activation = "gelu_tanh",
    *,
    backend: BackendChoice = "auto",
    config: Any = None,
) -> torch.Tensor:
    """Routed NVFP4 experts (weight-only): see `reference.nvfp4_moe_ref` for the exact math and shapes.

    Args:
        x: [T, H]; w13: uint8 [E, 2I, H/2] (gate rows first); w13_scale: e4m3 [E, 2I, H/16];
        w13_global: float32 [E] or [E, 2I]; w2: uint8 [E, H, I/2]; w2_scale: e4m3 [E, H, I/16];
        w2_global: float32 [E] or [E, H]; topk_weights: float32 [T, k]; topk_ids: int [T, k].
        activation: "gelu_tanh" or "silu".
        backend: "auto", "triton" or "torch".
        config: a `nvfp4_moe_kernel.MoeConfig` forcing the Triton launch configuration.
    Returns:
        [T, H] in x.dtype.
    """
    chosen = _resolve(backend, "nvfp4_w4a16_moe", x.device, ("auto", "triton", "torch"))
    args = (x, w13, w13_scale, w13_global, w2, w2_scale, w2_global, topk_weights, topk_ids, activation)
    if chosen == "torch":
        return nvfp4_moe_ref(*args)
    from .nvfp4_moe_kernel import nvfp4_moe_triton

    return nvfp4_moe_triton(*args, config=config)


def fp8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Fp8BackendChoice = "auto",
    config: Any = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T (+ bias) for an FP8 (e4m3) linear layer.

    "triton" is our W8A16 kernel (activations stay 16-bit); "scaled_mm" quantizes activations per token
    to e4m3 and runs `torch._scaled_mm` on FP8 tensor cores (sm_89+), so it is W8A8 and not bit-equal to
    the W8A16 reference. Block-scaled (128x128) weights always take the W8A16 path.

    Args:
        x: [M, K] activations; weight: float8_e4m3fn [N, K].
        weight_scale: float32 0-d/[1], [N]/[N, 1] or [ceil(N/128), ceil(K/128)].
        bias: optional [N].
        backend: "auto", "triton", "torch" or "scaled_mm".
        config: a `nvfp4_gemm_kernel.GemmConfig` forcing the Triton launch configuration.
    Returns:
        [M, N] in x.dtype.
    """
    chosen = _resolve(backend, "fp8_linear", x.device, ("auto", "triton", "torch", "scaled_mm"))
    if chosen == "scaled_mm":
        capability = _device_capability(x.device.index) if x.device.type == "cuda" else None
        chosen = fp8_path(capability, weight.shape, weight_scale)
    if chosen == "scaled_mm":
        return _fp8_scaled_mm(x, weight, weight_scale, bias)
    if chosen == "torch":
        return fp8_gemm_ref(x, weight, weight_scale, bias)
    from .fp8_gemm_kernel import fp8_gemm_triton

    return fp8_gemm_triton(x, weight, weight_scale, bias, config=config)


# Consumer Blackwell (sm_120 RTX 50xx / RTX PRO 6000, sm_121) has no row-wise scaled FP8 GEMM in cuBLASLt
# for torch._scaled_mm (pytorch#192707); tensor-wise scaling works there.
_NO_ROWWISE_SCALED_MM_MAJORS = (12,)


def scaled_mm_unsupported(
    capability: tuple[int, int], weight_shape: tuple[int, ...], weight_scale: torch.Tensor
) -> str | None:
    """Why `torch._scaled_mm` cannot run this FP8 layer on a GPU of `capability`, or None if it can.

    It takes per-tensor or per-channel (row-wise) scales with N and K multiples of 16 on sm_89+, and
    row-wise scales not on sm_12x. Everything else takes the W8A16 Triton kernel.
    """
    n, k = weight_shape
    per_tensor = weight_scale.numel() == 1
    per_channel = weight_scale.numel() == n and weight_scale.dim() in (1, 2)
    if not (per_tensor or per_channel):
        return "128x128 block scales"
    if n % 16 or k % 16:
        return f"N={n}, K={k} not multiples of 16"
    if capability < (8, 9):
        return f"no FP8 tensor cores (sm_{capability[0]}{capability[1]})"
    if not per_tensor and capability[0] in _NO_ROWWISE_SCALED_MM_MAJORS:
        arch = f"sm_{capability[0]}{capability[1]}"
        return f"per-channel scales on {arch} (no row-wise torch._scaled_mm, pytorch#192707)"
    return None


def fp8_path(
    capability: tuple[int, int] | None, weight_shape: tuple[int, ...], weight_scale: torch.Tensor
) -> Literal["scaled_mm", "triton", "torch"]:
    """Where an FP8 layer that asked for `torch._scaled_mm` runs: there if the GPU supports its scales,
    else on the W8A16 Triton kernel (the reason logged once per process); on a CPU (None) the reference."""
    if capability is None:
        return "torch"
    unsupported = scaled_mm_unsupported(capability, weight_shape, weight_scale)
    if unsupported is None:
        return "scaled_mm"
    _log_once(f"FP8 linears with {unsupported} run on the W8A16 Triton kernel, not torch._scaled_mm")
    return "triton"


@functools.cache
def _device_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info("nvfp4_ext: %s", message)


def _fp8_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 through `torch._scaled_mm` with dynamic per-token activation scales."""
    n = weight.shape[0]
    xf = x.float()
    if weight_scale.numel() == 1:
        # Tensor-wise scaling needs scalar scales on both sides.
        x_scale = (xf.abs().amax() / F8E4M3_MAX).clamp(min=1e-12)
        w_scale = weight_scale.float().reshape(())
        out_dtype = x.dtype
    else:
        # Row-wise scaling: [M, 1] x [1, N] float32 scales, bf16 output (what cuBLASLt supports).
        x_scale = (xf.abs().amax(dim=1, keepdim=True) / F8E4M3_MAX).clamp(min=1e-12)
        w_scale = weight_scale.float().reshape(1, n)
        out_dtype = torch.bfloat16
    x_fp8 = (xf / x_scale).clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype)
