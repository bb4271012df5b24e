"""vLLM linear methods of nvfp4_ext: NVFP4 (W4A4 and W4A16) and FP8 layers, with exact per-shard scales.

Fused layers (qkv_proj, gate_up_proj) are loaded shard by shard into one weight; each shard's global scale
(NVFP4) or per-tensor scale (FP8) is kept and expanded to one float32 multiplier per output row, so the fused
layer computes exactly what the unfused shards compute. vLLM's built-in ModelOpt method instead takes the max
over shards without rescaling the block scales.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BlockQuantScaleParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from nvfp4_ext.engines.common import (
    assert_loaded,
    backend_for,
    check_nvfp4_partition,
    fp8_linear_forward,
    nvfp4_linear_forward,
    per_row_global,
)
from nvfp4_ext.errors import ConfigError
from nvfp4_ext.format import FP8_BLOCK, NVFP4_BLOCK_SIZE

__all__ = ["Nvfp4ExtFp8LinearMethod", "Nvfp4ExtLinearMethod", "nvfp4_param_names"]


def nvfp4_param_names(producer: str) -> dict[str, str]:
    """Checkpoint tensor suffixes of an NVFP4 linear for a checkpoint producer."""
    if producer == "compressed-tensors":
        return {"weight": "weight_packed", "scale": "weight_scale", "global": "weight_global_scale",
                "input": "input_global_scale"}
    return {"weight": "weight", "scale": "weight_scale", "global": "weight_scale_2", "input": "input_scale"}


def _nan(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # NaN marks "not loaded yet"; process_weights_after_loading checks that every one was overwritten.
    return torch.full(shape, float("nan"), dtype=dtype)


@register_weight_loader_v2_supported_method
class Nvfp4ExtLinearMethod(LinearMethodBase):
    """NVFP4 linear layer: packed E2M1 weight [N, K/2], e4m3 block scales [N, K/16], one global per shard.

    On CPU and on GPUs without FP4 tensor cores both W4A4 and W4A16 run weight-only; a W4A4 layer's
    `input_scale` is still loaded and validated (it is used by the FlashInfer W4A4 path on sm >= 100).
    """

    def __init__(self, config, scheme: str, prefix: str) -> None:
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
            data=_nan((n, k // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn), input_dim=1, output_dim=0,
            weight_loader=loader,
        )
        layer.register_parameter(self.names["weight"], weight)
        layer.register_parameter(self.names["scale"], scale)
        shards = len(output_partition_sizes)
        layer.register_parameter(
            self.names["global"], PerTensorScaleParameter(data=_nan((shards,), torch.float32), weight_loader=loader)
        )
        if self.scheme == "nvfp4":
            layer.register_parameter(
                self.names["input"], PerTensorScaleParameter(data=_nan((shards,), torch.float32), weight_loader=loader)
            )

    def _scale_params(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        keys = ["scale", "global"] + (["input"] if self.scheme == "nvfp4" else [])
        return {self.names[k]: getattr(layer, self.names[k]) for k in keys}

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        assert_loaded(self.prefix, self._scale_params(layer), "NVFP4")
        stored = getattr(layer, self.names["global"]).data
        layer.nvfp4_global_per_row = per_row_global(stored, layer.nvfp4_shard_sizes, self.convention)
        layer.nvfp4_input_global = None
        if self.scheme == "nvfp4":
            # One activation scale for the fused input: the largest shard's keeps every shard in range.
            stored_input = getattr(layer, self.names["input"]).data
            from nvfp4_ext.format import global_multiplier

            layer.nvfp4_input_global = global_multiplier(stored_input.float(), self.convention).max()
        self.backend = backend_for(self.kind, getattr(layer, self.names["weight"]).device)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return nvfp4_linear_forward(
            x,
            getattr(layer, self.names["weight"]),
            getattr(layer, self.names["scale"]),
            layer.nvfp4_global_per_row,
            bias,
            self.backend,
            layer.nvfp4_input_global,
        )


@register_weight_loader_v2_supported_method
class Nvfp4ExtFp8LinearMethod(LinearMethodBase):
    """FP8 (e4m3) linear layer of a mixed-precision checkpoint: per-tensor (one scale per fused shard, kept
    exactly as per-row scales), per-channel or 128x128-block weight scales; computed weight-only (W8A16)."""

    def __init__(self, config, scheme: str, prefix: str) -> None:
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
                data=torch.empty(n, k, dtype=torch.float8_e4m3fn), input_dim=1, output_dim=0, weight_loader=loader
            ),
        )
        shards = len(output_partition_sizes)
        if self.scheme == "fp8":
            scale = PerTensorScaleParameter(data=_nan((shards,), torch.float32), weight_loader=loader)
            layer.register_parameter(
                "input_scale", PerTensorScaleParameter(data=_nan((shards,), torch.float32), weight_loader=loader)
            )
        elif self.scheme == "fp8_channel":
            scale = ChannelQuantScaleParameter(data=_nan((n, 1), torch.float32), output_dim=0, weight_loader=loader)
        else:
            bn, bk = FP8_BLOCK
            if any(size % bn for size in output_partition_sizes) or k % bk and k != input_size:
                raise ConfigError(
                    f"layer {self.prefix}: 128x128 block-FP8 shards {output_partition_sizes} x {k} do not split "
                    "on block boundaries at this tensor parallel size"
                )
            scale = BlockQuantScaleParameter(
                data=_nan((-(-n // bn), -(-k // bk)), torch.float32), input_dim=1, output_dim=0, weight_loader=loader
            )
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
        layer.fp8_weight_scale = scale
        self.backend = backend_for("fp8_linear", layer.weight.device)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_linear_forward(x, layer.weight, layer.fp8_weight_scale, bias, self.backend)
