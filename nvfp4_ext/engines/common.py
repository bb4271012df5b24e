"""Engine-agnostic layer logic shared by the vLLM and SGLang adapters (no engine imports here).

* global-scale assembly: fused qkv / gate_up shards keep their OWN NVFP4 global scale, carried as one float32
  multiplier per output row ([N]), so a fused layer computes exactly what its unfused shards compute (the
  engines' built-in methods take the max over shards and lose precision);
* tensor-parallel checks: packed nibbles and 16-element block scales can only be split on block boundaries;
* backend choice per layer kind (logged once per process) and the forward paths that call
  `nvfp4_ext.kernels` (torch reference on CPU, our Triton kernels on CUDA, FlashInfer FP4 on sm >= 100);
* the load-time repack of a Triton layer's weights into the kernels' layout (`pack_for_triton_kernels`);
* checks that every scale tensor a method created was filled from the checkpoint (NaN sentinels).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch

from nvfp4_ext.dispatch import Backend, LayerKind, select_backend
from nvfp4_ext.errors import CheckpointError, ConfigError
from nvfp4_ext.format import NVFP4_BLOCK_SIZE, GlobalScaleConvention, global_multiplier

__all__ = [
    "BACKENDS_USED",
    "assert_loaded",
    "backend_for",
    "check_nvfp4_partition",
    "flashinfer_input_scale_inverse",
    "flashinfer_nvfp4_weights",
    "fp8_linear_forward",
    "nvfp4_linear_forward",
    "nvfp4_moe_forward",
    "pack_for_triton_kernels",
    "per_row_global",
    "nvfp4_param_names",
    "restore_checkpoint_layout",
    "per_shard_global",
    "swizzle_block_scales",
    "unloaded",
    "working_tp_sizes",
]

logger = logging.getLogger("nvfp4_ext")

# (layer kind, backend) pairs chosen in this process, in order; logged once each.
BACKENDS_USED: dict[str, str] = {}


def nvfp4_param_names(producer: str) -> dict[str, str]:
    """Checkpoint tensor suffixes of an NVFP4 layer for a checkpoint producer (they are our param names)."""
    if producer == "compressed-tensors":
        return {
            "weight": "weight_packed",
            "scale": "weight_scale",
            "global": "weight_global_scale",
            "input": "input_global_scale",
        }
    return {"weight": "weight", "scale": "weight_scale", "global": "weight_scale_2", "input": "input_scale"}


def unloaded(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A scale parameter's initial value: NaN marks "not loaded", and `assert_loaded` checks that every one
    was overwritten by a checkpoint tensor (some model loaders silently skip tensors nobody asked for)."""
    return torch.full(shape, float("nan"), dtype=dtype)


# ------------------------------------------------------------------------------------------- global scales
def per_shard_global(stored: torch.Tensor, convention: GlobalScaleConvention) -> torch.Tensor:
    """Stored per-shard global scales -> float32 dequantization multipliers (same shape)."""
    return global_multiplier(stored.detach().float(), convention)


def per_row_global(
    stored: torch.Tensor, shard_sizes: Sequence[int], convention: GlobalScaleConvention
) -> torch.Tensor:
    """Expand one stored global scale per fused shard into one multiplier per output row.

    Args:
        stored: [num_shards] float32 global scales as the checkpoint stores them.
        shard_sizes: output rows of each shard in this partition (e.g. [q, k, v] or [gate, up]).
        convention: "modelopt" (multiplier) or "compressed_tensors" (divisor).
    Returns:
        float32 [sum(shard_sizes)]: row r of shard s gets shard s's multiplier, exactly.
    """
    if stored.numel() != len(shard_sizes):
        raise ValueError(f"expected {len(shard_sizes)} shard global scales, got shape {tuple(stored.shape)}")
    multipliers = per_shard_global(stored.reshape(-1), convention)
    sizes = torch.tensor(list(shard_sizes), device=multipliers.device)
    return multipliers.repeat_interleave(sizes).contiguous()


# ------------------------------------------------------------------------------------- tensor parallelism
def working_tp_sizes(full_size: int, candidates: Iterable[int] = (1, 2, 4, 8, 16)) -> list[int]:
    """Tensor-parallel sizes that split `full_size` into whole 16-element NVFP4 blocks."""
    return [tp for tp in candidates if full_size % tp == 0 and (full_size // tp) % NVFP4_BLOCK_SIZE == 0]


def check_nvfp4_partition(layer: str, what: str, full_size: int, size_per_partition: int) -> None:
    """Refuse a tensor-parallel split that cuts an NVFP4 block (packed nibbles + 16-element scales).

    Args:
        layer: the layer's name, for the message.
        what: the split dimension ("input features (K)" of a row-parallel linear, "expert intermediate size").
        full_size: the unsplit dimension.
        size_per_partition: this rank's share.
    Raises:
        ConfigError: the share is not a multiple of 16, naming the layer and the TP sizes that work.
    """
    if size_per_partition % NVFP4_BLOCK_SIZE == 0:
        return
    tp = max(1, round(full_size / max(size_per_partition, 1)))
    working = working_tp_sizes(full_size)
    raise ConfigError(
        f"layer {layer}: tensor parallel size {tp} splits its {what} of {full_size} into "
        f"{size_per_partition} "
        f"per rank, which is not a multiple of the NVFP4 block size {NVFP4_BLOCK_SIZE}; use "
        f"--tensor-parallel-size {max(working) if working else 1} (sizes that work: "
        f"{', '.join(map(str, working)) or 'none'})"
    )


# -------------------------------------------------------------------------------------------- loading
def assert_loaded(layer_name: str, params: dict[str, torch.Tensor], method: str) -> None:
    """Raise if a scale parameter still holds its NaN sentinel, i.e. the checkpoint never filled it.

    Args:
        layer_name: the layer's prefix, used to name the tensor.
        params: parameter name -> tensor, the scale parameters the method created.
        method: the quantization method, for the message.
    Raises:
        CheckpointError: naming the first missing tensor.
    """
    for name, tensor in params.items():
        missing = torch.isnan(tensor.detach().float())
        if bool(missing.any()):
            where = ""
            if missing.dim() >= 1 and missing.shape[0] > 1:
                first = int(missing.reshape(missing.shape[0], -1).any(-1).nonzero()[0])
                where = f" (first missing slice: index {first} of dim 0)"
            raise CheckpointError(
                f"the checkpoint does not provide this {method} scale tensor{where}; it is required for "
                "NVFP4 layers (re-export the checkpoint, or exclude the layer from quantization)",
                tensor=f"{layer_name}.{name}",
            )
        if name.endswith(("global_scale", "scale_2", "input_scale")):
            bad = ~torch.isfinite(tensor.detach().float()) | (tensor.detach().float() <= 0)
            if bool(bad.any()):
                raise CheckpointError(
                    f"global/input scales must be finite and positive, got "
                    f"{tensor.detach().float().tolist()}",
                    tensor=f"{layer_name}.{name}",
                )


# ------------------------------------------------------------------------------------------- dispatch
def backend_for(
    kind: LayerKind, device: torch.device, *, implemented: Sequence[str] | None = None
) -> Backend:
    """The backend for a layer kind on `device`, logged once per kind and process.

    Args:
        kind: the layer kind (see `nvfp4_ext.dispatch.LAYER_KINDS`).
        device: where the layer's weights live.
        implemented: backends this layer type has a code path for; a chosen backend outside it falls back
            to "triton" with the reason logged (e.g. FlashInfer's FP4 MoE is not wired in).
    """
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    backend = select_backend(kind, capability)
    if implemented is not None and backend not in implemented:
        if kind not in BACKENDS_USED:
            logger.warning("nvfp4_ext: %s has no %s path here; using our Triton kernels", kind, backend)
        backend = "triton"
    if kind not in BACKENDS_USED:
        BACKENDS_USED[kind] = backend
        logger.info("nvfp4_ext: %s layers run on the %s backend", kind, backend)
    return backend


# Weight bytes repacked per step, into the weight's own storage. `pack_nvfp4_weights` on a whole tensor
# allocates the words next to the checkpoint bytes, plus int64 copies of the scales: for DiffusionGemma's w13
# (128 x 1408 x 1408 bytes) 1.37 GB above the weight at its peak (measured on CPU), 165 MB in these steps.
_REPACK_CHUNK_BYTES = 4 << 20


def pack_for_triton_kernels(weight: torch.nn.Parameter, scale: torch.nn.Parameter, name: str) -> None:
    """Store an NVFP4 weight and its block scales in the layout our Triton kernels read, once, at load.

    Why: the Triton launchers also take checkpoint bytes, but then repack them on every call (a pass over
    the whole weight per forward). `nvfp4_ext.kernels.nvfp4_words.pack_nvfp4_weights` is exact and takes the
    same bytes, so it is done here in place: row chunk by row chunk into the parameters' own storage, which
    `.data` then views as int32 words [..., N, K/8] and uint8 scale codes [..., N, K/16]. The Parameter
    objects (what the forward, vLLM's reload and EPLB hold) stay the same and memory is not doubled.
    Call it only for layers on the "triton" backend: "torch" accepts either layout, but "flashinfer" and
    "emulated" read checkpoint bytes. Already packed weights are left alone (processing may run twice).

    Args:
        weight: uint8 [..., N, K/2] (2-D linear weight or 3-D [E, rows, K/2] experts), K % 16 == 0.
        scale: float8_e4m3fn [..., N, K/16] block scales.
        name: the parameter, named in errors.
    Raises:
        ValueError: wrong dtypes/shapes or a NaN block scale, naming `name` (before anything is written).
    """
    from nvfp4_ext.kernels.nvfp4_words import check_packable, is_packed, pack_nvfp4_weights

    if is_packed(weight.data):
        return
    # Checked whole here, not per chunk: a chunk failing halfway would leave the parameter half rewritten.
    check_packable(weight.data, scale.data, name)

    def pack_rows(rows: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pack_nvfp4_weights(rows, scales, name, check_values=False)  # checked above: no sync per step

    _rewrite_rows_in_place(weight, scale, torch.int32, torch.uint8, pack_rows)


def restore_checkpoint_layout(weight: torch.nn.Parameter, scale: torch.nn.Parameter) -> None:
    """Undo `pack_for_triton_kernels` in place, so checkpoint tensors can be loaded into the parameters
    again (SGLang's `restore_weights_before_loading` before a weight update). The values come back
    equivalent, not byte-identical: a negative block scale's sign stays in its codes, as at packing."""
    from nvfp4_ext.kernels.nvfp4_words import is_packed, unpack_nvfp4_weights

    if is_packed(weight.data):
        _rewrite_rows_in_place(weight, scale, torch.uint8, torch.float8_e4m3fn, unpack_nvfp4_weights)


def _rewrite_rows_in_place(weight, scale, weight_dtype, scale_dtype, convert) -> None:
    """`convert(weight_rows, scale_rows) -> (new weight rows, new scale rows)` of the same bytes, applied in
    row chunks into the parameters' own storage; then `.data` views that storage in the new dtypes."""
    old_weight, old_scale = weight.data.contiguous(), scale.data.contiguous()
    new_weight, new_scale = old_weight.view(weight_dtype), old_scale.view(scale_dtype)
    rows_in = old_weight.reshape(-1, old_weight.shape[-1])
    scales_in = old_scale.reshape(-1, old_scale.shape[-1])
    rows_out = new_weight.reshape(-1, new_weight.shape[-1])
    scales_out = new_scale.reshape(-1, new_scale.shape[-1])
    step = max(1, _REPACK_CHUNK_BYTES // max(1, rows_in.shape[1] * rows_in.element_size()))
    for start in range(0, rows_in.shape[0], step):
        rows = slice(start, start + step)
        converted_weight, converted_scale = convert(rows_in[rows], scales_in[rows])
        # Both results are new tensors, so the chunk's input bytes are free to overwrite now.
        rows_out[rows], scales_out[rows] = converted_weight, converted_scale
    weight.data, scale.data = new_weight, new_scale


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def nvfp4_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    global_per_row: torch.Tensor,
    bias: torch.Tensor | None,
    backend: Backend,
    input_global: torch.Tensor | None = None,
    weight_scale_swizzled: torch.Tensor | None = None,
    input_global_inv: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T (+ bias) for an NVFP4 linear layer with per-row global multipliers.

    Args:
        x: [..., K]; weight: uint8 [N, K/2]; weight_scale: e4m3 [N, K/16] (on "triton": int32 words
            [N, K/8] and uint8 scale codes, `pack_for_triton_kernels`); global_per_row: float32 [N].
        bias: optional [N].
        backend: from `backend_for`: "torch"/"triton" run weight-only (W4A16); "flashinfer" runs W4A4 on
            FP4 tensor cores with the static `input_global` multiplier (GPU only); "emulated" runs the
            same W4A4 math in torch (`nvfp4_ext.kernels.fp4_emulation`).
        input_global: float32 multiplier of the activations (W4A4 only).
        weight_scale_swizzled: FlashInfer only, from `flashinfer_nvfp4_weights` at load; `weight` is then
            the padded weight it returned.
        input_global_inv: FlashInfer only, 1 / input_global as float32 [1], computed at load.
    Returns:
        [..., N] in x.dtype.
    """
    flat, lead = _flatten(x)
    if backend == "emulated":
        from nvfp4_ext.kernels.fp4_emulation import nvfp4_w4a4_gemm_emulated

        if input_global is None:
            raise ConfigError("the emulated W4A4 backend needs the layer's input_scale (a W4A4 checkpoint)")
        out = nvfp4_w4a4_gemm_emulated(flat, weight, weight_scale, global_per_row, bias, input_global)
    elif backend == "flashinfer":
        if input_global is None or input_global_inv is None or weight_scale_swizzled is None:
            raise ConfigError(
                "FlashInfer W4A4 needs the layer's input_scale and the weights prepared at load "
                "(flashinfer_nvfp4_weights); this layer has not been prepared"
            )
        out = _flashinfer_nvfp4_linear(
            flat, weight, weight_scale_swizzled, global_per_row, bias, input_global, input_global_inv
        )
    else:
        from nvfp4_ext.kernels import nvfp4_gemm

        out = nvfp4_gemm(flat, weight, weight_scale, global_per_row, bias, backend=backend)
    return out.reshape(*lead, out.shape[-1])


def swizzle_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """Lay out e4m3 block scales [M, K/16] in the 128x4 tiles CUTLASS/FlashInfer FP4 GEMMs read.

    Rows are padded to a multiple of 128 and scale columns to a multiple of 4 (zeros), then each
    128x4 tile is stored as 32 x (4 x 4). Pure torch, on the tensor's own device.

    Returns:
        float8_e4m3fn [ceil(M/128)*128, ceil(K16/4)*4].
    """
    m, k = scale.shape
    mp, kp = ceil_div(m, 128) * 128, ceil_div(k, 4) * 4
    padded = torch.zeros(mp, kp, dtype=scale.dtype, device=scale.device)
    padded[:m, :k] = scale
    tiles = padded.view(torch.uint8).reshape(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.contiguous().reshape(mp, kp).view(scale.dtype)


# CUTLASS FP4 GEMMs (FlashInfer's "cutlass" backend) need N and K to be multiples of 32; vLLM pads the same
# way. DiffusionGemma's expert width 2112 at TP=4 is 528 = 16 * 33, for example.
FLASHINFER_FP4_ALIGNMENT = 32


def flashinfer_nvfp4_weights(
    weight: torch.Tensor, weight_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of a FlashInfer W4A4 layer, prepared once at load.

    Args:
        weight: uint8 [N, K/2] packed E2M1; weight_scale: e4m3 [N, K/16].
    Returns:
        (weight zero-padded to [ceil(N/32)*32, ceil(K/32)*16] (the input itself when aligned), its block
        scales swizzled). The swizzle pads rows to 128 and scale columns to 4 (K to 64) with zeros, which
        covers the weight's padding: padded K columns are zero codes with zero scales, padded N rows give
        output columns that `_flashinfer_nvfp4_linear` slices off.
    """
    n, half_k = weight.shape
    rows = ceil_div(n, FLASHINFER_FP4_ALIGNMENT) * FLASHINFER_FP4_ALIGNMENT
    half_cols = ceil_div(2 * half_k, FLASHINFER_FP4_ALIGNMENT) * FLASHINFER_FP4_ALIGNMENT // 2
    if (rows, half_cols) != (n, half_k):
        weight = torch.nn.functional.pad(weight, (0, half_cols - half_k, 0, rows - n)).contiguous()
    return weight, swizzle_block_scales(weight_scale)


def flashinfer_input_scale_inverse(input_global: torch.Tensor) -> torch.Tensor:
    """1 / input multiplier as float32 [1]: FlashInfer's `fp4_quantize` divides by the multiplier."""
    return (1.0 / input_global.double()).float().reshape(1)


_FP4_QUANTIZE_DTYPES = (torch.float16, torch.bfloat16)


def _flashinfer_nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_swizzled: torch.Tensor,
    global_per_row: torch.Tensor,
    bias: torch.Tensor | None,
    input_global: torch.Tensor,
    input_global_inv: torch.Tensor,
) -> torch.Tensor:
    """W4A4 GEMM with FlashInfer on FP4 tensor cores (sm >= 100). The per-row weight global is applied to the
    output columns, which is exact (it is constant along K). `weight` / `weight_scale_swizzled` come from
    `flashinfer_nvfp4_weights` (padded to multiples of 32); the padding is sliced off the output.

    `fp4_quantize` takes fp16/bf16 only: float32 activations are rounded to bf16 first (8 mantissa bits,
    far finer than the E2M1 codes they are quantized to next); the output is returned in x's dtype.
    """
    import flashinfer

    if x.dtype not in _FP4_QUANTIZE_DTYPES + (torch.float32,):
        raise ConfigError(f"FlashInfer W4A4 takes fp16, bf16 or float32 activations, got {x.dtype}")
    n, k = global_per_row.shape[0], x.shape[-1]
    x_in = x if x.dtype in _FP4_QUANTIZE_DTYPES else x.to(torch.bfloat16)
    padded_k = weight.shape[1] * 2
    if padded_k != k:
        x_in = torch.nn.functional.pad(x_in, (0, padded_k - k))
    x_fp4, x_sf = flashinfer.fp4_quantize(x_in, input_global_inv)
    out = flashinfer.mm_fp4(
        x_fp4,
        weight.t(),
        x_sf,
        weight_scale_swizzled.t(),
        input_global.reshape(1),
        torch.bfloat16,
        backend="cutlass",
    )
    out = out[:, :n].float() * global_per_row
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def nvfp4_moe_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_global: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    backend: Backend,
    w13_input_global: torch.Tensor | None = None,
    w2_input_global: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed NVFP4 experts through `nvfp4_ext.kernels.nvfp4_moe` (weight-only), or W4A4 in torch.

    Args:
        x: [T, H]; w13 uint8 [E, 2I, H/2]; w13_scale e4m3 [E, 2I, H/16]; w13_global float32 [E, 2I] per row;
        w2 uint8 [E, H, I/2]; w2_scale e4m3 [E, H, I/16]; w2_global float32 [E, H]; on "triton" the weights
        and scales are int32 words [..., K/8] and uint8 scale codes (`pack_for_triton_kernels`).
        topk_weights float32 [T, k]; topk_ids int [T, k]; activation "gelu_tanh" or "silu".
        backend: "torch" or "triton" (FlashInfer's FP4 MoE is not wired in; see `backend_for(implemented=)`),
            or "emulated": W4A4, each expert's input and gated activation quantized under its input scale.
        w13_input_global, w2_input_global: float32 [E] activation multipliers ("emulated" only).
    Returns:
        [T, H] in x.dtype.
    """
    import nvfp4_ext.kernels  # noqa: F401  (registers torch.ops.nvfp4_ext.*)

    if backend == "emulated":
        from nvfp4_ext.kernels.fp4_emulation import nvfp4_w4a4_moe_emulated

        if w13_input_global is None or w2_input_global is None:
            raise ConfigError("the emulated W4A4 MoE needs the experts' input scales (a W4A4 checkpoint)")
        return nvfp4_w4a4_moe_emulated(
            x,
            w13,
            w13_scale,
            w13_global,
            w2,
            w2_scale,
            w2_global,
            topk_weights,
            topk_ids,
            activation,
            w13_input_global,
            w2_input_global,
        )

    chosen = "torch" if backend == "torch" else "triton"
    # The opaque custom op, not the launcher: vLLM's CPU platform calls the MoE layer's forward directly
    # (no moe_forward op), so a compiled model would otherwise trace the data-dependent expert alignment.
    return torch.ops.nvfp4_ext.nvfp4_moe(
        x, w13, w13_scale, w13_global, w2, w2_scale, w2_global, topk_weights, topk_ids, activation, chosen
    )


def fp8_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    backend: Backend,
) -> torch.Tensor:
    """y = x @ dequant(W_fp8).T (+ bias); weight_scale per tensor, per row [N] or 128x128 blocks."""
    import nvfp4_ext.kernels  # noqa: F401  (registers torch.ops.nvfp4_ext.*)

    flat, lead = _flatten(x)
    chosen = backend if backend in ("torch", "triton", "scaled_mm") else "triton"
    # The opaque custom op keeps compiled engines (vLLM's fullgraph torch.compile) out of the launcher.
    out = torch.ops.nvfp4_ext.fp8_gemm(flat, weight, weight_scale, bias, chosen)
    return out.reshape(*lead, out.shape[-1])


def ceil_div(a: int, b: int) -> int:
    """Integer ceil(a / b)."""
    return math.ceil(a / b)
