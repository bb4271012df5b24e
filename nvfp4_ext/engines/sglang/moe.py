"""SGLang fused-MoE method of nvfp4_ext: NVFP4 experts with gated gelu_tanh (DiffusionGemma, Gemma 4) or silu
(Qwen3-MoE, Mixtral) activations, on every GPU generation from Ampere on.

SGLang's own NVFP4 MoE refuses gelu_tanh and needs Blackwell (or Marlin, silu only, below it); this method
launches `nvfp4_ext.kernels.nvfp4_moe` directly from `apply()` (no MoE runner: `get_moe_runner_backend`
returns None, i.e. standard top-k output with local expert ids). Weights load per expert and per shard
(w1 = gate, w3 = up, w2 = down) through our own loader, which slices the intermediate dimension for
tensor parallelism on whole NVFP4 blocks and skips experts another expert-parallel rank owns.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase

from nvfp4_ext.engines.common import (
    assert_loaded,
    backend_for,
    check_nvfp4_partition,
    nvfp4_moe_forward,
    nvfp4_param_names,
    pack_for_triton_kernels,
    restore_checkpoint_layout,
    unloaded,
)
from nvfp4_ext.errors import CheckpointError, ConfigError
from nvfp4_ext.format import NVFP4_BLOCK_SIZE, global_multiplier

__all__ = ["SUPPORTED_ACTIVATIONS", "Nvfp4ExtMoEMethod"]

logger = logging.getLogger("nvfp4_ext")

SUPPORTED_ACTIVATIONS = ("gelu_tanh", "silu")
_SHARD_COLUMN = {"w1": 0, "w3": 1}
# HF `hidden_activation` values that mean tanh-approximated GELU (transformers' ACT2FN name).
_TANH_GELU_DECLARED = ("gelu_pytorch_tanh",)


class Nvfp4ExtMoEMethod(FusedMoEMethodBase):
    """NVFP4 routed experts: w13 [E, 2I, H/2] (gate rows first), w2 [E, H, I/2], e4m3 block scales, and
    one global scale per expert and shard ([E, 2] for w13, [E] for w2)."""

    def __init__(self, config, scheme: str, prefix: str) -> None:
        self.config = config
        self.scheme = scheme
        self.prefix = prefix
        self.names = nvfp4_param_names(config.quant.producer)
        self.convention = config.quant.global_scale_convention
        self.runner = None
        self.moe_runner_config = None

    # ------------------------------------------------------------------------------------------- weights
    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra,
    ) -> None:
        if extra.get("with_bias"):
            raise ConfigError(f"layer {self.prefix}: NVFP4 experts with biases are not supported")
        full_intermediate = extra.get("moe_intermediate_size") or intermediate_size_per_partition
        check_nvfp4_partition(
            self.prefix, "expert intermediate size", full_intermediate, intermediate_size_per_partition
        )
        if hidden_size % NVFP4_BLOCK_SIZE:
            raise ConfigError(f"layer {self.prefix}: hidden size {hidden_size} is not a multiple of 16")
        experts, hidden, inter = num_experts, hidden_size, intermediate_size_per_partition
        layer.nvfp4_intermediate = inter
        shapes = {
            ("w13", "weight"): ((experts, 2 * inter, hidden // 2), torch.uint8),
            ("w13", "scale"): ((experts, 2 * inter, hidden // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn),
            ("w13", "global"): ((experts, 2), torch.float32),
            ("w13", "input"): ((experts, 2), torch.float32),
            ("w2", "weight"): ((experts, hidden, inter // 2), torch.uint8),
            ("w2", "scale"): ((experts, hidden, inter // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn),
            ("w2", "global"): ((experts,), torch.float32),
            ("w2", "input"): ((experts,), torch.float32),
        }
        for (proj, role), (shape, dtype) in shapes.items():
            data = torch.zeros(shape, dtype=dtype) if role == "weight" else unloaded(shape, dtype)
            param = torch.nn.Parameter(data, requires_grad=False)
            param.weight_loader = self._make_loader(layer, proj, role)
            layer.register_parameter(f"{proj}_{self.names[role]}", param)

    def _make_loader(self, layer: torch.nn.Module, proj: str, role: str):
        """A FusedMoE-style loader `(param, loaded, weight_name, shard_id, expert_id)` for one parameter."""

        def load(
            param: torch.nn.Parameter, loaded: torch.Tensor, weight_name: str, shard_id: str, expert_id: int
        ) -> None:
            local = _local_expert(layer, expert_id)
            if local < 0:
                return  # another expert-parallel rank owns this expert
            if (proj == "w13") != (shard_id in _SHARD_COLUMN) or shard_id not in ("w1", "w2", "w3"):
                raise CheckpointError(f"shard {shard_id!r} does not belong to {proj}", tensor=weight_name)
            target = param.data[local]
            if role in ("global", "input"):
                value = loaded.detach().reshape(-1)
                if value.numel() != 1:
                    raise CheckpointError(
                        f"expected one scale per expert shard, got shape {tuple(loaded.shape)}",
                        tensor=weight_name,
                    )
                if proj == "w13":
                    target[_SHARD_COLUMN[shard_id]] = value[0]
                else:
                    param.data[local] = value[0]
                return
            inter = layer.nvfp4_intermediate
            rank = getattr(layer, "moe_tp_rank", 0)
            per_byte = 2 if role == "weight" else NVFP4_BLOCK_SIZE
            if proj == "w13":  # rows = intermediate features of this rank
                rows = loaded.narrow(0, rank * inter, inter)
                offset = _SHARD_COLUMN[shard_id] * inter
                _copy(target.narrow(0, offset, inter), rows, weight_name)
            else:  # columns = intermediate features (packed 2 per byte / 16 per scale)
                width = inter // per_byte
                _copy(target, loaded.narrow(1, rank * width, width), weight_name)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        names = self.names
        required = {f"w13_{names[r]}": getattr(layer, f"w13_{names[r]}") for r in ("scale", "global")}
        required.update({f"w2_{names[r]}": getattr(layer, f"w2_{names[r]}") for r in ("scale", "global")})
        assert_loaded(self.prefix, required, "NVFP4 expert")
        inter = layer.nvfp4_intermediate
        w13_global = global_multiplier(
            getattr(layer, f"w13_{names['global']}").detach().float(), self.convention
        )
        # One multiplier per w13 row: gate rows take the gate shard's scale, up rows the up shard's (exact).
        layer.nvfp4_w13_global = w13_global.repeat_interleave(inter, dim=1).contiguous()
        w2_stored = getattr(layer, f"w2_{names['global']}").detach().float()
        w2_global = global_multiplier(w2_stored, self.convention)
        hidden = getattr(layer, f"w2_{names['weight']}").shape[1]
        # Per output row ([E, H]) now, so the kernel launcher passes it through instead of expanding per call.
        layer.nvfp4_w2_global = w2_global.unsqueeze(1).expand(-1, hidden).contiguous()
        layer.nvfp4_w13_input_global = layer.nvfp4_w2_input_global = None
        if self.scheme == "nvfp4":  # W4A4: activation multipliers for the emulated backend, [E] each
            w13_input = getattr(layer, f"w13_{names['input']}").detach().float()
            layer.nvfp4_w13_input_global = global_multiplier(w13_input, self.convention).amax(dim=1)
            layer.nvfp4_w2_input_global = global_multiplier(
                getattr(layer, f"w2_{names['input']}").detach().float(), self.convention
            )
        # Decided once; FlashInfer's FP4 MoE is not wired in, so a "flashinfer" choice runs (and is logged
        # as) our Triton kernels.
        kind = "nvfp4_moe" if self.scheme == "nvfp4" else "nvfp4_w4a16_moe"
        layer.nvfp4_backend = backend_for(kind, w2_global.device, implemented=("torch", "triton", "emulated"))
        if layer.nvfp4_backend == "triton":
            # The kernels' word layout once here, not per call; SGLang's EPLB moves whole experts (dim 0),
            # which this layout keeps intact.
            for proj in ("w13", "w2"):
                name = f"{self.prefix}.{proj}_{names['weight']}"
                pack_for_triton_kernels(*_projection_params(layer, names, proj), name)

    def restore_weights_before_loading(self, layer: torch.nn.Module) -> None:
        """Back to the checkpoint's layout before SGLang loads new weights into these experts
        (`update_weights_from_disk`, `begin_weight_update`); `process_weights_after_loading` runs after."""
        for proj in ("w13", "w2"):
            restore_checkpoint_layout(*_projection_params(layer, self.names, proj))

    # ---------------------------------------------------------------------------------------- execution
    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config) -> None:
        activation = self._model_activation(
            getattr(moe_runner_config.activation, "value", moe_runner_config.activation)
        )
        if activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"layer {self.prefix}: expert activation {activation!r} is not supported by nvfp4_ext "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if not getattr(moe_runner_config, "is_gated", True):
            raise ConfigError(f"layer {self.prefix}: non-gated experts are not supported by nvfp4_ext")
        self.moe_runner_config = moe_runner_config
        self.activation = activation
        factor = getattr(moe_runner_config, "routed_scaling_factor", None)
        owned = factor is not None and factor != 1.0 and _runner_owns_routed_scaling()
        self.routed_scaling_factor = float(factor) if owned else None
        self.runner = None

    def _model_activation(self, requested: str) -> str:
        """The activation the checkpoint's model defines. SGLang 0.5.23's autoregressive Gemma 4 class
        builds its experts without `activation=`, so they ask for FusedMoE's default erf "gelu" although
        Gemma 4 declares `hidden_activation: gelu_pytorch_tanh` (as its diffusion class passes). Only that
        declared mismatch is corrected; an erf-GELU model, or one whose config we did not see, is refused."""
        declared = self.config.hidden_activation
        if requested != "gelu" or declared not in _TANH_GELU_DECLARED:
            return requested
        if not self.config.logged_gelu_tanh_override:
            self.config.logged_gelu_tanh_override = True
            logger.warning(
                "nvfp4_ext: layer %s (and every other expert layer of this model): SGLang's model class asks "
                "for erf 'gelu' experts, but the model config declares hidden_activation %r; running "
                "gelu_tanh, as the checkpoint's model defines it",
                self.prefix,
                declared,
            )
        return "gelu_tanh"

    def get_moe_runner_backend(self, layer: torch.nn.Module):
        return None  # direct kernel: standard top-k output, local expert ids

    def apply(self, layer: torch.nn.Module, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

        x = dispatch_output.hidden_states
        topk_output = dispatch_output.topk_output
        if getattr(getattr(topk_output, "format", None), "name", None) != "STANDARD":
            raise ConfigError(
                f"layer {self.prefix}: nvfp4_ext experts need SGLang's standard top-k output, got "
                f"{type(topk_output).__name__}; use --moe-runner-backend auto and no --moe-a2a-backend"
            )
        topk_weights, topk_ids = topk_output[0], topk_output[1]
        # Expert parallelism marks tokens routed to other ranks with id -1: zero weight on expert 0.
        # (No `if dropped.any()`: a host sync per layer would break CUDA-graph capture.)
        dropped = topk_ids < 0
        topk_weights = topk_weights.masked_fill(dropped, 0.0)
        topk_ids = topk_ids.masked_fill(dropped, 0)
        names = self.names
        out = nvfp4_moe_forward(
            x,
            getattr(layer, f"w13_{names['weight']}"),
            getattr(layer, f"w13_{names['scale']}"),
            layer.nvfp4_w13_global,
            getattr(layer, f"w2_{names['weight']}"),
            getattr(layer, f"w2_{names['scale']}"),
            layer.nvfp4_w2_global,
            topk_weights.float(),
            topk_ids,
            self.activation,
            layer.nvfp4_backend,
            layer.nvfp4_w13_input_global,
            layer.nvfp4_w2_input_global,
        )
        if self.routed_scaling_factor is not None:
            out = out * self.routed_scaling_factor
        return StandardCombineInput(hidden_states=out)


def _runner_owns_routed_scaling() -> bool:
    """Whether the fused-MoE method, not the model, applies `routed_scaling_factor`. SGLang 0.5.23's
    DeepseekV2MoE multiplies the experts' output by it itself only off CUDA/MUSA/XPU (deepseek_v2.py,
    `if not _is_cuda and not _is_musa ...: final_hidden_states *= self.routed_scaling_factor`); on those
    devices its Triton runner applies it in the expert sum. We follow the same split, so the factor is
    applied exactly once on a GPU and on CPU."""
    from sglang.srt.utils import is_cuda, is_musa, is_xpu

    return is_cuda() or is_musa() or is_xpu()


def _projection_params(layer: torch.nn.Module, names: dict[str, str], proj: str):
    """(weight, block scale) parameters of "w13" or "w2"."""
    return getattr(layer, f"{proj}_{names['weight']}"), getattr(layer, f"{proj}_{names['scale']}")


def _local_expert(layer: torch.nn.Module, expert_id: int) -> int:
    mapper = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
    return expert_id if mapper is None else mapper(expert_id)


def _copy(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise CheckpointError(
            f"expected shape {tuple(target.shape)} for this expert shard (after tensor-parallel slicing), "
            f"got {tuple(source.shape)}",
            tensor=name,
        )
    target.copy_(source.to(target.dtype))
