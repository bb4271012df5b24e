"""vLLM fused-MoE method of nvfp4_ext: NVFP4 routed experts loaded with vLLM's expert weight loader.

Checkpoint tensors per expert e (ModelOpt names; compressed-tensors use weight_packed / weight_global_scale /
input_global_scale): `experts.{e}.gate_proj|up_proj|down_proj.{weight, weight_scale, weight_scale_2,
input_scale}`. They land in `w13_*` ([E, 2I, ...], gate rows first) and `w2_*` ([E, H, ...]). Gate and up keep
their own global scale: after loading they become per-row multipliers w13_global [E, 2I] and w2_global [E, H].
Routing is done by vLLM before `apply`; the activation comes from the model (`layer.activation`).

The class name must not contain "ModelOpt" or "compressed": vLLM's expert loader special-cases those names;
ours takes the generic path, driven by each parameter's `quant_method` attribute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

from nvfp4_ext.engines.common import (
    assert_loaded,
    backend_for,
    check_nvfp4_partition,
    nvfp4_moe_forward,
    nvfp4_param_names,
    pack_for_triton_kernels,
    unloaded,
)
from nvfp4_ext.errors import ConfigError
from nvfp4_ext.format import NVFP4_BLOCK_SIZE, global_multiplier

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

    from .config import Nvfp4ExtConfig

__all__ = ["Nvfp4ExtFusedMoEMethod"]

_ACTIVATIONS = ("gelu_tanh", "silu")


class Nvfp4ExtFusedMoEMethod(FusedMoEMethodBase):
    """NVFP4 experts (W4A4 or W4A16 checkpoints; computed weight-only on CPU and pre-Blackwell GPUs)."""

    def __init__(self, config: Nvfp4ExtConfig, scheme: str, prefix: str, moe: FusedMoEConfig) -> None:
        super().__init__(moe)
        self.config = config
        self.scheme = scheme
        self.prefix = prefix
        self.names = nvfp4_param_names(config.quant.producer)
        self.convention = config.quant.global_scale_convention
        self.kind = "nvfp4_moe" if scheme == "nvfp4" else "nvfp4_w4a16_moe"
        self.backend = "torch"

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        inter = intermediate_size_per_partition
        full_inter = getattr(self.moe, "intermediate_size", None) or inter
        if hidden_size % NVFP4_BLOCK_SIZE:
            raise ConfigError(f"layer {self.prefix}: hidden size {hidden_size} is not a multiple of 16")
        check_nvfp4_partition(self.prefix, "expert intermediate size", full_inter, inter)
        loader = extra_weight_attrs["weight_loader"]
        w, s, g, i = (self.names[k] for k in ("weight", "scale", "global", "input"))
        params = {
            f"w13_{w}": torch.empty(num_experts, 2 * inter, hidden_size // 2, dtype=torch.uint8),
            f"w2_{w}": torch.empty(num_experts, hidden_size, inter // 2, dtype=torch.uint8),
            f"w13_{s}": unloaded(
                (num_experts, 2 * inter, hidden_size // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn
            ),
            f"w2_{s}": unloaded((num_experts, hidden_size, inter // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn),
            f"w13_{g}": unloaded((num_experts, 2), torch.float32),
            f"w2_{g}": unloaded((num_experts,), torch.float32),
        }
        if self.scheme == "nvfp4":
            params[f"w13_{i}"] = unloaded((num_experts, 2), torch.float32)
            params[f"w2_{i}"] = unloaded((num_experts,), torch.float32)
        for name, data in params.items():
            param = torch.nn.Parameter(data, requires_grad=False)
            layer.register_parameter(name, param)
            attrs = {"weight_loader": loader}
            if name.endswith(f"_{s}"):
                attrs["quant_method"] = FusedMoeWeightScaleSupported.GROUP.value
            elif name.endswith((f"_{g}", f"_{i}")):
                attrs["quant_method"] = FusedMoeWeightScaleSupported.TENSOR.value
            if name == f"w13_{i}" and i == "input_scale":
                # vLLM's generic loader writes an expert's input_scale into one [E] slot, so gate would be
                # overwritten by up; keep both shards.
                attrs["weight_loader"] = _shard_input_scale_loader(layer)
            set_weight_attrs(param, attrs)
        self.scale_names = [n for n in params if not n.endswith(f"_{w}")]

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        assert_loaded(self.prefix, {n: getattr(layer, n) for n in self.scale_names}, "NVFP4 MoE")
        g = self.names["global"]
        w13_shard = global_multiplier(getattr(layer, f"w13_{g}").data.float(), self.convention)  # [E, 2]
        w2_expert = global_multiplier(getattr(layer, f"w2_{g}").data.float(), self.convention)  # [E]
        inter = getattr(layer, f"w13_{self.names['weight']}").shape[1] // 2
        hidden = getattr(layer, f"w2_{self.names['weight']}").shape[1]
        layer.nvfp4_w13_global = w13_shard.repeat_interleave(inter, dim=1).contiguous()  # [E, 2I]
        layer.nvfp4_w2_global = w2_expert.unsqueeze(1).expand(-1, hidden).contiguous()  # [E, H]
        layer.nvfp4_w13_input_global = layer.nvfp4_w2_input_global = None
        if self.scheme == "nvfp4":
            # One activation multiplier per expert input: gate and up read the same activations.
            i = self.names["input"]
            w13_input = global_multiplier(getattr(layer, f"w13_{i}").data.float(), self.convention)
            layer.nvfp4_w13_input_global = w13_input.amax(dim=1).contiguous()  # [E]
            layer.nvfp4_w2_input_global = global_multiplier(
                getattr(layer, f"w2_{i}").data.float(), self.convention
            ).contiguous()  # [E]
        self.backend = backend_for(
            self.kind, layer.nvfp4_w13_global.device, implemented=("torch", "triton", "emulated")
        )
        if self.backend == "triton":
            # The kernels' word layout once here, not per call; EPLB moves whole experts (dim 0), which
            # this layout keeps intact.
            w, s = self.names["weight"], self.names["scale"]
            for proj in ("w13", "w2"):
                pack_for_triton_kernels(
                    getattr(layer, f"{proj}_{w}"), getattr(layer, f"{proj}_{s}"), f"{self.prefix}.{proj}_{w}"
                )

    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        return None

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        activation = getattr(layer.activation, "value", layer.activation)
        if activation not in _ACTIVATIONS:
            raise ConfigError(
                f"layer {self.prefix}: activation {activation!r} is not supported ({_ACTIVATIONS})"
            )
        w, s = self.names["weight"], self.names["scale"]
        if layer.expert_map is not None:
            # Expert parallelism: translate global expert ids to this rank's; others contribute nothing.
            local = layer.expert_map[topk_ids.long()]
            topk_weights = torch.where(local >= 0, topk_weights, torch.zeros_like(topk_weights))
            topk_ids = local.clamp(min=0)
        return nvfp4_moe_forward(
            x,
            getattr(layer, f"w13_{w}"),
            getattr(layer, f"w13_{s}"),
            layer.nvfp4_w13_global,
            getattr(layer, f"w2_{w}"),
            getattr(layer, f"w2_{s}"),
            layer.nvfp4_w2_global,
            topk_weights,
            topk_ids,
            activation,
            self.backend,
            layer.nvfp4_w13_input_global,
            layer.nvfp4_w2_input_global,
        )


def _shard_input_scale_loader(layer: torch.nn.Module):
    """A weight loader writing w1 (gate) / w3 (up) input scales into slots 0 / 1 of a [E, 2] parameter."""

    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        local = layer._map_global_expert_id_to_local_expert_id(expert_id)
        if local == -1:
            return False if return_success else None
        if shard_id == "w2":
            param.data[local] = loaded_weight.reshape(())
        else:
            param.data[local][0 if shard_id == "w1" else 1] = loaded_weight.reshape(())
        return True if return_success else None

    return load
