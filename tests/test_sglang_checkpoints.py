"""Tiny NVFP4 checkpoints for the SGLang tests (helpers only; the tests live in test_sglang_*.py).

`quantize_tiny_checkpoint` turns a BF16/FP32 tiny model of `nvfp4_ext.tiny_models` into a ModelOpt-style
NVFP4 (W4A4) checkpoint: experts per expert (`experts.<e>.{gate,up,down}_proj.*`, the layout NVIDIA's
exports use, also when the source stores fused `experts.gate_up_proj` / `down_proj`), every other `*_proj`
linear NVFP4, and routers, embeddings, lm_head and the DiffusionGemma encoder/vision tower left as they are
and listed in the config's `ignore`. It uses only `nvfp4_ext.format` (ModelOpt-exact math).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_ext.checkpoint.names import pattern_matches
from nvfp4_ext.format import quantize_nvfp4

EXCLUDE = ["lm_head", "*router*", "*.mlp.gate", "model.encoder*", "*embed_tokens"]
_LINEAR = re.compile(r"^(?P<module>.*_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(?P<parent>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_INPUT_SCALE = {"gate_proj": 0.02, "up_proj": 0.02, "down_proj": 0.03}


def _nvfp4(prefix: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    q = quantize_nvfp4(weight.float())
    input_scale = _INPUT_SCALE.get(prefix.rsplit(".", 1)[-1], 0.01)
    return {
        f"{prefix}.weight": q.qdata,
        f"{prefix}.weight_scale": q.scale,
        f"{prefix}.weight_scale_2": q.global_scale.reshape(()).float(),
        f"{prefix}.input_scale": torch.tensor(input_scale, dtype=torch.float32),
    }


def _excluded(module: str) -> bool:
    return any(pattern_matches(p, module) for p in EXCLUDE)


def quantize_tiny_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write an NVFP4 copy (ModelOpt flat `quantization_config`) of the one-file model `src` to `dst`."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensor = f.get_tensor(name)
            fused = _FUSED_EXPERTS.match(name)
            linear = _LINEAR.match(name)
            if fused and not _excluded(fused["parent"]):
                parent = fused["parent"]
                for expert in range(tensor.shape[0]):
                    if fused["proj"] == "gate_up_proj":
                        gate, up = tensor[expert].chunk(2, dim=0)
                        out.update(_nvfp4(f"{parent}.{expert}.gate_proj", gate))
                        out.update(_nvfp4(f"{parent}.{expert}.up_proj", up))
                    else:
                        out.update(_nvfp4(f"{parent}.{expert}.down_proj", tensor[expert]))
            elif linear and tensor.dim() == 2 and not _excluded(linear["module"]):
                out.update(_nvfp4(linear["module"], tensor))
            else:
                out[name] = tensor
    save_file(
        {k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "kv_cache_quant_algo": None,
        "ignore": EXCLUDE,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.name not in ("model.safetensors", "config.json") and extra.is_file():
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst
