"""vLLM linear methods of nvfp4_ext: NVFP4 (W4A4 and W4A16) and FP8 layers, with exact per-shard scales.

Fused layers (qkv_proj, gate_up_proj) are loaded shard by shard into one weight; each shard's global scale
(NVFP4) or per-tensor scale (FP8) is kept and expanded to one float32 multiplier per output row, so the fused
layer computes exactly what the unfused shards compute. vLLM's built-in ModelOpt method instead takes the max
over shards without rescaling the block scales.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

import nvfp4_ext.engines.custom_ops  # noqa: F401  (registers torch.ops.nvfp4_ext.nvfp4_linear)
from nvfp4_ext.engines.common import (
    assert_loaded,
    backend_for,
    check_nvfp4_partition,
    flashinfer_input_scale_inverse,
    flashinfer_nvfp4_weights,
    fp8_linear_forward,
    nvfp4_param_names,
    pack_for_triton_kernels,
    per_row_global,
    unloaded,
)
from nvfp4_ext.errors import CheckpointError, ConfigError
from nvfp4_ext.format import FP8_BLOCK, NVFP4_BLOCK_SIZE

if TYPE_CHECKING:
    from .config import Nvfp4ExtConfig

__all__ = ["Nvfp4ExtFp8LinearMethod", "Nvfp4ExtLinearMethod"]


@register_weight_loader_v2_supported_method
class Nvfp4ExtLinearMethod(LinearMethodBase):
    """NVFP4 linear layer: packed E2M1 weight [N, K/2], e4m3 block scales [N, K/16], one global per shard.

    On CPU and on GPUs without FP4 tensor cores both W4A4 and W4A16 run weight-only; a W4A4 layer's
    `input_scale` is still loaded and validated (it is used by the FlashInfer W4A4 path on sm >= 100).
    """

    def __init__(self, config: Nvfp4ExtConfig, scheme: str, prefix: str) -> None:
        self.config = config
        self.scheme = scheme
        self.prefix = prefix
        self.names = nvfp4_param_names(config.quant.producer)
        self.convention = config.quant.global_scale_convention
        self.kind = "nvfp4_linear" if scheme == "nvfp4" else "nvfp4_w4a16_linear"
        self.backend = "torch"

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        if input_size % NVFP4_BLOCK_SIZE:
            raise ConfigError(
                f"layer {self.prefix}: {input_size} input features is not a multiple of {NVFP4_BLOCK_SIZE}; "
                "NVFP4 cannot store it (exclude the layer when quantizing)"
            )
        check_nvfp4_partition(self.prefix, "input features (K)", input_size, input_size_per_partition)
        loader = extra_weight_attrs["weight_loader"]
        k, n = input_size_per_partition, sum(output_partition_sizes)
        layer.nvfp4_shard_sizes = list(output_partition_sizes)
        weight = ModelWeightParameter(
            data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, output_dim=0, weight_loader=loader
        )
        scale = ModelWeightParameter(
            data=unloaded((n, k // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn),
            input_dim=1,
            output_dim=0,
            weight_loader=loader,
        )
        layer.register_parameter(self.names["weight"], weight)
        layer.register_parameter(self.names["scale"], scale)
        shards = len(output_partition_sizes)
        layer.register_parameter(
            self.names["global"],
            PerTensorScaleParameter(data=unloaded((shards,), torch.float32), weight_loader=loader),
        )
        if self.scheme == "nvfp4":
            layer.register_parameter(
                self.names["input"],
                PerTensorScaleParameter(data=unloaded((shards,), torch.float32), weight_loader=loader),
            )

    def _scale_params(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        keys = ["scale", "global"] + (["input"] if self.scheme == "nvfp4" else [])
        return {self.names[k]: getattr(layer, self.names[k]) for k in keys}

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        assert_loaded(self.prefix, self._scale_params(layer), "NVFP4")
        stored = getattr(layer, self.names["global"]).data
        layer.nvfp4_global_per_row = per_row_global(stored, layer.nvfp4_shard_sizes, self.convention)
        layer.nvfp4_input_global = None
        if self.scheme == "nvfp4" and self.prefix.endswith("kv_b_proj"):
            # MLA (DeepSeek V3, Kimi K2) absorbs kv_b_proj: vLLM dequantizes it by applying the layer to an
            # identity matrix, which a W4A4 path would quantize to FP4 with the calibrated input scale
            # (1.0 clipped or rounded). Computing it weight-only gives the exact dequantized weight.
            self.kind = "nvfp4_w4a16_linear"
        elif self.scheme == "nvfp4":
            # One activation scale for the fused input: the largest shard's keeps every shard in range.
            stored_input = getattr(layer, self.names["input"]).data
            from nvfp4_ext.format import global_multiplier

            layer.nvfp4_input_global = global_multiplier(stored_input.float(), self.convention).max()
        weight = getattr(layer, self.names["weight"])
        self.backend = backend_for(self.kind, weight.device)
        layer.nvfp4_scale_swizzled = None
        layer.nvfp4_input_global_inv = None
        if self.backend == "flashinfer":
            # Once, here: padding to CUTLASS's multiples of 32 (replacing the checkpoint-shaped weight, so
            # memory is not doubled), the scale swizzle and the reciprocal input scale.
            padded, layer.nvfp4_scale_swizzled = flashinfer_nvfp4_weights(
                weight.data, getattr(layer, self.names["scale"]).data
            )
            weight.data = padded
            layer.nvfp4_input_global_inv = flashinfer_input_scale_inverse(layer.nvfp4_input_global)
        elif self.backend == "triton":
            # The kernels' word layout once here, not per call (vLLM's layerwise reload restores the
            # checkpoint shapes it recorded at create_weights and runs this again).
            pack_for_triton_kernels(
                weight, getattr(layer, self.names["scale"]), f"{self.prefix}.{self.names['weight']}"
            )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Through the opaque custom op: vLLM's fullgraph torch.compile must not trace into the kernel
        # launchers (config choice, Triton launch), it sees only the op's shape function.
        return torch.ops.nvfp4_ext.nvfp4_linear(
            x,
            getattr(layer, self.names["weight"]),
            getattr(layer, self.names["scale"]),
            layer.nvfp4_global_per_row,
            bias,
            layer.nvfp4_input_global,
            layer.nvfp4_scale_swizzled,
            layer.nvfp4_input_global_inv,
            self.backend,
        )


@register_weight_loader_v2_supported_method
class Nvfp4ExtFp8LinearMethod(LinearMethodBase):
    """FP8 (e4m3) linear layer of a mixed-precision checkpoint: per-tensor (one scale per fused shard, kept
    exactly as per-row scales), per-channel or 128x128-block weight scales; computed weight-only (W8A16)."""

    def __init__(self, config: Nvfp4ExtConfig, scheme: str, prefix: str) -> None:
        self.config = config
        self.scheme = scheme
        self.prefix = prefix
        self.backend = "torch"

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs["weight_loader"]
        k, n = input_size_per_partition, sum(output_partition_sizes)
        layer.fp8_shard_sizes = list(output_partition_sizes)
        layer.register_parameter(
            "weight",
            ModelWeightParameter(
                data=torch.empty(n, k, dtype=torch.float8_e4m3fn),
                input_dim=1,
                output_dim=0,
                weight_loader=loader,
            ),
        )
        shards = len(output_partition_sizes)
        if self.scheme == "fp8":
            scale = PerTensorScaleParameter(data=unloaded((shards,), torch.float32), weight_loader=loader)
            layer.register_parameter(
                "input_scale",
                PerTensorScaleParameter(data=unloaded((shards,), torch.float32), weight_loader=loader),
            )
        elif self.scheme == "fp8_channel":
            scale = ChannelQuantScaleParameter(
                data=unloaded((n, 1), torch.float32), output_dim=0, weight_loader=loader
            )
        else:
            scale = _block_scale_parameter(self.prefix, layer, output_partition_sizes, k, input_size)
        layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        params = {"weight_scale": layer.weight_scale}
        if self.scheme == "fp8":
            params["input_scale"] = layer.input_scale
        assert_loaded(self.prefix, params, "FP8")
        scale = layer.weight_scale.data.float()
        if self.scheme == "fp8":
            scale = per_row_global(scale, layer.fp8_shard_sizes, "modelopt")
        elif self.scheme == "fp8_channel":
            scale = scale.reshape(-1)
        else:
            # Each shard keeps its own 128x128 block grid: (row slice of the weight, its block scales).
            scale = _split_block_scales(scale, layer.fp8_shard_sizes)
        layer.fp8_weight_scale = scale
        self.backend = backend_for("fp8_linear", layer.weight.device)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not isinstance(layer.fp8_weight_scale, list):
            return fp8_linear_forward(x, layer.weight, layer.fp8_weight_scale, bias, self.backend)
        outs = []
        for rows, scale in layer.fp8_weight_scale:
            shard_bias = None if bias is None else bias[rows]
            outs.append(fp8_linear_forward(x, layer.weight[rows], scale, shard_bias, self.backend))
        return torch.cat(outs, dim=-1)


def _block_rows(sizes: list[int]) -> list[int]:
    return [-(-size // FP8_BLOCK[0]) for size in sizes]


def _split_block_scales(scale: torch.Tensor, sizes: list[int]) -> list[tuple[slice, torch.Tensor]]:
    out, row, block_row = [], 0, 0
    for size, blocks in zip(sizes, _block_rows(sizes), strict=True):
        out.append((slice(row, row + size), scale[block_row : block_row + blocks].contiguous()))
        row, block_row = row + size, block_row + blocks
    return out


def _block_scale_parameter(
    prefix: str, layer: torch.nn.Module, sizes: list[int], k: int, input_size: int
) -> torch.nn.Parameter:
    """128x128 block scales stored shard by shard ([sum ceil(n_s/128), ceil(K/128)]).

    vLLM's block-scale loader puts fused shards at ceil(row_offset/128), which overlaps shards whose sizes are
    not multiples of 128 (q/k/v of small models); this loader gives every shard its own block rows.
    """
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import RowParallelLinear

    bn, bk = FP8_BLOCK
    rank, tp = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    row_parallel = isinstance(layer, RowParallelLinear)
    if tp > 1 and (k % bk if row_parallel else any(size % bn for size in sizes)):
        raise ConfigError(
            f"layer {prefix}: tensor parallel size {tp} splits its 128x128 FP8 blocks "
            f"(shards {sizes} x {k}); "
            "use --tensor-parallel-size 1 for this checkpoint"
        )
    block_rows = _block_rows(sizes)
    param = torch.nn.Parameter(unloaded((sum(block_rows), -(-k // bk)), torch.float32), requires_grad=False)
    offsets = [sum(block_rows[:i]) for i in range(len(sizes))]

    def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        index = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id) if shard_id is not None else 0
        rows = block_rows[index]
        if row_parallel and tp > 1:
            loaded = loaded.narrow(1, rank * param.shape[1], param.shape[1])
        elif tp > 1:
            loaded = loaded.narrow(0, rank * rows, rows)
        target = param.data[offsets[index] : offsets[index] + rows]
        if tuple(loaded.shape) != tuple(target.shape):
            raise CheckpointError(
                f"expected block scales of shape {list(target.shape)}, got {list(loaded.shape)}",
                tensor=f"{prefix}.weight_scale",
            )
        target.copy_(loaded)

    param.weight_loader = load
    return param
