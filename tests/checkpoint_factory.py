"""Tiny checkpoints written with safetensors directly (no dependency on `nvfp4-ext quantize`).

`build_mixed` makes the reference mixed checkpoint of the tests: NVFP4 experts (per-expert in layer 0,
fused 3-D in layer 1), FP8 attention, a BF16 router and lm_head excluded by pattern, a BF16 embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nvfp4_ext.format import quantize_fp8, quantize_nvfp4, stored_global_scale

HIDDEN = 64
INTERMEDIATE = 32
EXPERTS = 4
VOCAB = 48
HEADS_DIM = 32  # q/o width; k/v width 16


def nvfp4_tensors(
    prefix: str, w: torch.Tensor, *, convention: str = "modelopt", w4a4: bool = True, bare: bool = False
) -> dict[str, torch.Tensor]:
    """Quantize `w` ([N, K] or [E, N, K]) and name its tensors in ModelOpt or compressed-tensors style.

    `bare` names a fused 3-D parameter `P`, `P_weight_scale`, `P_weight_scale_2`, `P_input_scale`.
    """
    q = quantize_nvfp4(w)
    sep = "_" if bare else "."
    multiplier = q.global_scale.reshape(-1) if w.dim() == 3 else q.global_scale.reshape(1)
    input_multiplier = torch.full_like(multiplier, 0.02)
    if convention == "modelopt":
        out = {
            f"{prefix}{'' if bare else '.weight'}": q.qdata,
            f"{prefix}{sep}weight_scale": q.scale,
            f"{prefix}{sep}weight_scale_2": multiplier,
        }
        if w4a4:
            out[f"{prefix}{sep}input_scale"] = input_multiplier
        return out
    out = {
        f"{prefix}.weight_packed": q.qdata,
        f"{prefix}.weight_scale": q.scale,
        f"{prefix}.weight_global_scale": stored_global_scale(multiplier, "compressed_tensors"),
    }
    if w4a4:
        out[f"{prefix}.input_global_scale"] = stored_global_scale(input_multiplier, "compressed_tensors")
    return out


def fp8_tensors(prefix: str, w: torch.Tensor, granularity: str = "tensor") -> dict[str, torch.Tensor]:
    q, scale = quantize_fp8(w, granularity)  # type: ignore[arg-type]
    if granularity == "tensor":
        scale = scale.reshape(())
    input_scale = torch.tensor(0.01)
    return {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale, f"{prefix}.input_scale": input_scale}


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    quantization_config: dict | None = None,
    *,
    hf_quant_config: dict | None = None,
    shards: int = 1,
) -> Path:
    """Write config.json (+ hf_quant_config.json) and one file or `shards` files with an index json."""
    directory.mkdir(parents=True, exist_ok=True)
    config: dict = {"model_type": "tiny_moe", "hidden_size": HIDDEN}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    if hf_quant_config is not None:
        (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=1))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(directory / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard_name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return directory


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.05


MIXED_EXCLUDES = ["lm_head", "*router*"]


def mixed_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(checkpoint tensors, original float weights by module) of the mixed reference model."""
    g = torch.Generator().manual_seed(seed)
    originals: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _randn(VOCAB, HIDDEN, generator=g).bfloat16(),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": _randn(VOCAB, HIDDEN, generator=g).bfloat16(),
    }
    for layer in range(2):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for proj, n, k in (("q_proj", HEADS_DIM, HIDDEN), ("k_proj", 16, HIDDEN), ("v_proj", 16, HIDDEN),
                           ("o_proj", HIDDEN, HEADS_DIM)):  # fmt: skip
            w = _randn(n, k, generator=g)
            originals[f"{p}.self_attn.{proj}"] = w
            tensors.update(fp8_tensors(f"{p}.self_attn.{proj}", w))
        tensors[f"{p}.mlp.router.weight"] = _randn(EXPERTS, HIDDEN, generator=g).bfloat16()
        if layer == 0:
            for e in range(EXPERTS):
                for proj, n, k in (("gate_proj", INTERMEDIATE, HIDDEN), ("up_proj", INTERMEDIATE, HIDDEN),
                                   ("down_proj", HIDDEN, INTERMEDIATE)):  # fmt: skip
                    name = f"{p}.mlp.experts.{e}.{proj}"
                    originals[name] = _randn(n, k, generator=g)
                    tensors.update(nvfp4_tensors(name, originals[name]))
        else:
            fused_shapes = (("gate_up_proj", 2 * INTERMEDIATE, HIDDEN), ("down_proj", HIDDEN, INTERMEDIATE))
            for proj, n, k in fused_shapes:
                name = f"{p}.mlp.experts.{proj}"
                originals[name] = _randn(EXPERTS, n, k, generator=g)
                tensors.update(nvfp4_tensors(name, originals[name], bare=True))
    return tensors, originals


def mixed_config() -> dict:
    """MIXED_PRECISION config.json quantization_config of the mixed reference model."""
    layers: dict[str, dict] = {}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layers[f"model.layers.{layer}.self_attn.{proj}"] = {"quant_algo": "FP8"}
        layers[f"model.layers.{layer}.mlp.experts"] = {"quant_algo": "NVFP4", "group_size": 16}
    return {
        "quant_method": "modelopt",
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_scheme": None,
        "exclude_modules": MIXED_EXCLUDES,
        "quantized_layers": layers,
    }


def build_mixed(directory: Path, *, shards: int = 2, seed: int = 0) -> Path:
    tensors, _ = mixed_tensors(seed)
    return write_checkpoint(directory, tensors, mixed_config(), shards=shards)


def nvfp4_config(algo: str = "NVFP4", exclude: list[str] | None = None) -> dict:
    exclude = exclude or ["lm_head"]
    return {"quant_method": "modelopt", "quant_algo": algo, "group_size": 16, "exclude_modules": exclude}


def ct_nvfp4_config(w4a4: bool = True, ignore: list[str] | None = None) -> dict:
    args = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
    group: dict = {"targets": ["Linear"], "weights": args, "format": "nvfp4-pack-quantized"}
    group["input_activations"] = {**args, "dynamic": "local"} if w4a4 else None
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "config_groups": {"group_0": group},
        "ignore": ignore or ["lm_head"],
    }


def dense_nvfp4_tensors(seed: int = 0, convention: str = "modelopt") -> dict[str, torch.Tensor]:
    """A 1-layer dense NVFP4 model: q/k/v/o and gate/up/down quantized, embedding and lm_head BF16."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _randn(VOCAB, HIDDEN, generator=g).bfloat16(),
        "lm_head.weight": _randn(VOCAB, HIDDEN, generator=g).bfloat16(),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
    }
    shapes = {"self_attn.q_proj": (32, 64), "self_attn.k_proj": (16, 64), "self_attn.v_proj": (16, 64),
              "self_attn.o_proj": (64, 32), "mlp.gate_proj": (32, 64), "mlp.up_proj": (32, 64),
              "mlp.down_proj": (64, 32)}  # fmt: skip
    for name, (n, k) in shapes.items():
        w = _randn(n, k, generator=g)
        tensors.update(nvfp4_tensors(f"model.layers.0.{name}", w, convention=convention))
    return tensors
