"""Load a DiffusionGemma checkpoint (BF16/FP32, or NVFP4/FP8 from `nvfp4-ext quantize`) into transformers.

Quantized checkpoints are dequantized into a temporary directory with `nvfp4_ext.quantize.
dequantize_checkpoint` and then loaded as a plain model, so the NVFP4 rounding is exactly what the CPU run
sees (weights are W ~= e2m1 * block scale * global scale; activations stay in the run dtype).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nvfp4_ext.errors import CheckpointError, ConfigError

__all__ = ["ARCHITECTURE", "is_quantized", "load_diffusion_gemma", "load_tokenizer"]

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError("model directory does not exist", file=str(model_dir))
    if not path.is_file():
        raise CheckpointError("missing config.json", file=str(path))
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable JSON ({exc})", file=str(path)) from None


def is_quantized(model_dir: str | os.PathLike) -> bool:
    """True when the checkpoint carries a quantization config (ModelOpt or compressed-tensors)."""
    root = Path(model_dir)
    return "quantization_config" in _read_config(root) or (root / "hf_quant_config.json").is_file()


def load_diffusion_gemma(model_dir: str | os.PathLike, dtype: str | torch.dtype = "float32") -> Any:
    """`DiffusionGemmaForBlockDiffusion` in eval mode from a plain or quantized checkpoint directory.

    Raises:
        CheckpointError: missing/unreadable directory or config, or another architecture (names the file).
        ConfigError: unsupported dtype.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    root = Path(model_dir)
    config = _read_config(root)
    architectures = config.get("architectures") or []
    if ARCHITECTURE not in architectures:
        raise CheckpointError(
            f"architectures is {architectures!r}; `generate` runs {ARCHITECTURE} only",
            file=str(root / "config.json"),
        )
    from transformers import DiffusionGemmaForBlockDiffusion

    if not is_quantized(root):
        return DiffusionGemmaForBlockDiffusion.from_pretrained(root, dtype=dtype).eval()
    from nvfp4_ext.quantize import dequantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="nvfp4_ext_dequant_") as tmp:
        plain = dequantize_checkpoint(root, Path(tmp) / "model", dtype=torch.float32)
        return DiffusionGemmaForBlockDiffusion.from_pretrained(plain, dtype=dtype).eval()


def load_tokenizer(model_dir: str | os.PathLike) -> Any | None:
    """The checkpoint's tokenizer, or None when it has none."""
    root = Path(model_dir)
    if not any(
        (root / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root)
