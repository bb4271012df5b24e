"""SGLang linear methods of nvfp4_ext: NVFP4 (W4A4 / W4A16) and FP8 layers of ModelOpt, mixed and
compressed-tensors checkpoints.

Fused layers (qkv_proj, gate_up_proj) load shard by shard; every shard keeps its own global scale, expanded
to one float32 multiplier per output row (`nvfp4_ext.engines.common.per_row_global`), so a fused layer
computes exactly what its unfused shards compute. The forward runs `nvfp4_ext.kernels` through
`nvfp4_ext.engines.common` (torch on CPU, our Triton kernels on sm80-sm90, FlashInfer FP4 on sm100+).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.parameter import (
    BlockQuantScaleParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)
from sglang.srt.layers.quantization.base_config import LinearMethodBase

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
    per_shard_global,
    restore_checkpoint_layout,
    unloaded,
)
from nvfp4_ext.errors import ConfigError
from nvfp4_ext.format import FP8_BLOCK, NVFP4_BLOCK_SIZE

__all__ = ["Nvfp4ExtFp8LinearMethod", "Nvfp4ExtLinearMethod"]


class Nvfp4ExtLinearMethod(LinearMethodBase):
    """NVFP4 linear layer: packed E2M1 weight [N, K/2], e4m3 block scales [N, K/16], one global per shard.

    W4A16 layers, and W4A4 layers below sm100, run weight-only (activations stay BF16/FP16); W4A4 layers on
    sm100+ run on FP4 tensor cores with the checkpoint's static input scale.
    """

    def __init__(self, config, scheme: str, prefix: str) -> None:
        self.config = config
        self.quant_config = config  # the name SGLang's fused-linear loaders look up
        self.scheme = scheme
        self.prefix = prefix
        self.names = nvfp4_param_names(config.quant.producer)
        self.convention = config.quant.global_scale_convention

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
        check_nvfp4_partition(self.prefix, "input features (K)", input_size, input_size_per_partition)
        loader = extra_weight_attrs.get("weight_loader")
        rows = sum(output_partition_sizes)
        shards = len(output_partition_sizes)
        layer.logical_widths = list(output_partition_sizes)
        names = self.names
        layer.register_parameter(
            names["weight"],
            ModelWeightParameter(
                data=torch.zeros(rows, input_size_per_partition // 2, dtype=torch.uint8),
                input_dim=1,
                output_dim=0,
                weight_loader=loader,
            ),
        )
        layer.register_parameter(
            names["scale"],
            ModelWeightParameter(
                data=unloaded((rows, input_size_per_partition // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn),
                input_dim=1,
                output_dim=0,
                weight_loader=loader,
            ),
        )
        layer.register_parameter(
            names["global"],
            PerTensorScaleParameter(data=unloaded((shards,), torch.float32), weight_loader=loader),
        )
        layer.register_parameter(
            names["input"],
            PerTensorScaleParameter(data=unloaded((shards,), torch.float32), weight_loader=loader),
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        names = self.names
        required = {
            names["scale"]: getattr(layer, names["scale"]),
            names["global"]: getattr(layer, names["global"]),
        }
        if self.scheme == "nvfp4":
            required[names["input"]] = getattr(layer, names["input"])
        assert_loaded(self.prefix, required, "NVFP4")
        stored_global = getattr(layer, names["global"]).detach()
        layer.nvfp4_global_per_row = per_row_global(stored_global, layer.logical_widths, self.convention)
        input_scale = getattr(layer, names["input"]).detach().float()
        # One activation scale for the fused GEMM: the largest shard's, as FlashInfer takes a scalar.
        layer.nvfp4_input_global = per_shard_global(input_scale.nan_to_num(1.0), self.convention).max()
        # Everything the forward needs is decided and laid out once, here, not per call.
        kind = "nvfp4_linear" if self.scheme == "nvfp4" else "nvfp4_w4a16_linear"
        weight = getattr(layer, names["weight"])
        layer.nvfp4_backend = backend_for(kind, weight.device)
        layer.nvfp4_scale_swizzled = None
        layer.nvfp4_input_global_inv = None
        if layer.nvfp4_backend == "flashinfer":
            padded, layer.nvfp4_scale_swizzled = flashinfer_nvfp4_weights(
                weight.data, getattr(layer, names["scale"]).data
            )
            weight.data = padded  # replaces the checkpoint-shaped weight: no second copy in memory
            layer.nvfp4_input_global_inv = flashinfer_input_scale_inverse(layer.nvfp4_input_global)
        elif layer.nvfp4_backend == "triton":
            scale = getattr(layer, names["scale"])
            pack_for_triton_kernels(weight, scale, f"{self.prefix}.{names['weight']}")

    def restore_weights_before_loading(self, layer: torch.nn.Module) -> None:
        """Back to the checkpoint's shapes and dtypes before SGLang loads new weights into this layer
        (`update_weights_from_disk`, `begin_weight_update`); `process_weights_after_loading` runs after."""
        weight, scale = getattr(layer, self.names["weight"]), getattr(layer, self.names["scale"])
        restore_checkpoint_layout(weight, scale)
        rows, half_k = scale.shape[0], scale.shape[1] * NVFP4_BLOCK_SIZE // 2
        if tuple(weight.shape) != (rows, half_k):  # FlashInfer's padding (flashinfer_nvfp4_weights)
            weight.data = weight.data[:rows, :half_k].contiguous()

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The opaque custom op: `--enable-torch-compile` must not trace the Triton launcher or FlashInfer.
        return torch.ops.nvfp4_ext.nvfp4_linear(
            x,
            getattr(layer, self.names["weight"]),
            getattr(layer, self.names["scale"]),
            layer.nvfp4_global_per_row,
            bias,
            layer.nvfp4_input_global,
            layer.nvfp4_scale_swizzled,
            layer.nvfp4_input_global_inv,
            layer.nvfp4_backend,
        )


class Nvfp4ExtFp8LinearMethod(LinearMethodBase):
    """FP8 (e4m3) linear layer of a mixed checkpoint: per-tensor (per shard), per-channel or 128x128
    blocks."""

    def __init__(self, config, scheme: str, prefix: str) -> None:
        self.config = config
        self.quant_config = config  # the name SGLang's fused-linear loaders look up
        self.scheme = scheme
        self.prefix = prefix

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
        loader = extra_weight_attrs.get("weight_loader")
        rows = sum(output_partition_sizes)
        layer.logical_widths = list(output_partition_sizes)
        layer.register_parameter(
            "weight",
            ModelWeightParameter(
                data=torch.zeros(rows, input_size_per_partition, dtype=torch.float8_e4m3fn),
                input_dim=1,
                output_dim=0,
                weight_loader=loader,
            ),
        )
        if self.scheme == "fp8_channel":
            scale = ChannelQuantScaleParameter(
                data=unloaded((rows, 1), torch.float32), output_dim=0, weight_loader=loader
            )
        elif self.scheme == "fp8_block":
            block_n, block_k = FP8_BLOCK
            if len(output_partition_sizes) > 1 and any(size % block_n for size in output_partition_sizes):
                raise ConfigError(
                    f"layer {self.prefix}: fused shards of {output_partition_sizes} rows do not align with "
                    f"the {block_n}x{block_k} FP8 blocks; their block scales cannot share one fused grid"
                )
            grid = (-(-rows // block_n), -(-input_size_per_partition // block_k))
            scale = BlockQuantScaleParameter(
                data=unloaded(grid, torch.float32), input_dim=1, output_dim=0, weight_loader=loader
            )
        else:
            scale = PerTensorScaleParameter(
                data=unloaded((len(output_partition_sizes),), torch.float32), weight_loader=loader
            )
        layer.register_parameter("weight_scale", scale)
        # Static activation scale of W8A8 exports; weight-only compute ignores it but must accept it.
        layer.register_parameter(
            "input_scale",
            PerTensorScaleParameter(
                data=torch.ones(len(output_partition_sizes), dtype=torch.float32), weight_loader=loader
            ),
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        assert_loaded(self.prefix, {"weight_scale": layer.weight_scale}, "FP8")
        scale = layer.weight_scale.detach().float()
        if self.scheme == "fp8":  # one scale per shard -> one per output row (exact for fused layers)
            sizes = torch.tensor(layer.logical_widths, device=scale.device)
            scale = scale.reshape(-1).repeat_interleave(sizes)
        elif self.scheme == "fp8_channel":
            scale = scale.reshape(-1)
        layer.fp8_weight_scale = scale.contiguous()
        layer.fp8_backend = backend_for("fp8_linear", layer.weight.device)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return fp8_linear_forward(x, layer.weight, layer.fp8_weight_scale, bias, layer.fp8_backend)
