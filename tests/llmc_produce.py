"""Run inside the llm-compressor venv (`.venv/llmc`, built by scripts/install.sh): make a compressed-tensors
NVFP4 checkpoint with llm-compressor's `oneshot` and a float32 reference dequantized by compressed-tensors
itself.

    .venv/llmc/bin/python tests/llmc_produce.py SOURCE_DIR OUT_DIR REFERENCE_DIR SCHEME [...]

SCHEME is an llm-compressor preset ("NVFP4" = W4A4, "NVFP4A16" = weight-only, "FP8" / "FP8_DYNAMIC" /
"FP8_BLOCK" = pure FP8) or "MIXED": NVFP4 on the MLPs/experts and FP8_DYNAMIC (FP8 per-channel weights,
dynamic per-token activations) on attention, passed to llm-compressor as its own `{preset: targets}` form,
which it writes as two config groups with format `mixed-precision`. A "-KVFP8" suffix adds llm-compressor's
`kv_cache_scheme` (FP8 KV cache, calibrated per-tensor k/v scales). The calibration set is a few
deterministic random token sequences (the tiny models' word vocabulary has no natural text). The reference is compressed-tensors' own dequantization of every NVFP4 and
FP8 weight (`write_reference`), saved in float32.
Prints one JSON line `PRODUCED={...}` with the output directory, the versions and llm-compressor's per-module
decision (module -> scheme name) read from the quantized model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _calibration(vocab_size: int, samples: int = 8, seq_len: int = 32):
    import datasets

    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, vocab_size, (seq_len,), generator=gen).tolist() for _ in range(samples)]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len for _ in ids]})


# Attention and GDN projections are what NVIDIA's mixed releases keep in FP8; MLPs, routed and shared experts
# get NVFP4.
MIXED_SCHEME = {
    "FP8_DYNAMIC": ["re:.*self_attn\\..*", "re:.*linear_attn\\..*"],
    "NVFP4": ["re:.*mlp\\..*", "re:.*experts\\..*"],  # Gemma 4's experts sit beside its dense mlp
}


# llm-compressor's own presets used as they are; FP8 / FP8_DYNAMIC / FP8_BLOCK make pure FP8 checkpoints
# (per-tensor / per-channel / 128x128-block weights), which are not NVFP4.
PRESETS = ("NVFP4", "NVFP4A16", "FP8", "FP8_DYNAMIC", "FP8_BLOCK")
# "<preset>-KVFP8": the preset plus llm-compressor's `kv_cache_scheme` (static per-tensor FP8 k/v scales).
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _recipe_scheme(scheme: str) -> str | dict[str, list[str]]:
    if scheme in PRESETS:
        return scheme
    if scheme == "MIXED":
        return MIXED_SCHEME
    raise SystemExit(f"unknown scheme {scheme!r} ({', '.join(PRESETS)} or MIXED, optionally with -KVFP8)")


def _decisions(model: torch.nn.Module) -> dict[str, str]:
    """module name -> "nvfp4" (weights and input activations FP4), "nvfp4_w4a16", or "fp8" / "fp8_channel"
    (FP8 weights per tensor / per output channel), from each module's `quantization_scheme` (what
    llm-compressor attached and compressed-tensors serialises)."""
    out = {}
    # Every name of a shared module (DiffusionGemma's encoder and decoder share their text layers, and the
    # checkpoint stores both copies).
    for name, module in model.named_modules(remove_duplicate=False):
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        weights = scheme.weights
        if weights.type != "float":
            raise SystemExit(f"unexpected weight scheme on {name}: {weights}")
        if weights.num_bits == 4 and weights.group_size == 16:
            acts = scheme.input_activations
            out[name] = "nvfp4" if acts is not None and acts.num_bits == 4 else "nvfp4_w4a16"
        elif weights.num_bits == 8 and weights.strategy in ("tensor", "channel", "block"):
            out[name] = {"tensor": "fp8", "channel": "fp8_channel", "block": "fp8_block"}[weights.strategy]
        else:
            raise SystemExit(f"unexpected weight scheme on {name}: {weights}")
    return out


def write_reference(source: Path, out: Path, reference: Path) -> None:
    """A float32 HF checkpoint of `out`: every `weight_packed` dequantized by compressed-tensors' own NVFP4
    functions (`unpack_fp4_from_uint8` + `dequantize` with the checkpoint's QuantizationArgs, the steps of
    `NVFP4PackedCompressor.decompress`, run in float32 rather than its bf16 default so no rounding is added),
    every FP8 `weight` by the same `dequantize` with its FP8 group's QuantizationArgs (the float-quantized
    decompressor's step), the source's config and tokenizer."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    sys.path.insert(0, str(Path(__file__).parent))
    from producers import read_tensors, write_float32_reference

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    # One group per weight precision (what the recipes above write), so the stored tensors tell the group:
    # a packed uint8 weight is the 4-bit group's, an fp8 weight the 8-bit group's.
    args_by_bits: dict[int, QuantizationArgs] = {}
    for group in qcfg["config_groups"].values():
        args = QuantizationArgs.model_validate(group["weights"])
        if args.num_bits in args_by_bits:
            raise SystemExit(f"two config groups with {args.num_bits}-bit weights")
        args_by_bits[args.num_bits] = args
    tensors = read_tensors(out)
    weights = {}
    for key, value in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix == "weight_packed":
            rows, half = value.shape
            codes = unpack_fp4_from_uint8(value, rows, half * 2, dtype=torch.float32)
            weights[f"{module}.weight"] = dequantize(
                x_q=codes,
                scale=tensors[f"{module}.weight_scale"].to(torch.float32),
                args=args_by_bits[4],
                global_scale=tensors[f"{module}.weight_global_scale"].to(torch.float32),
                dtype=torch.float32,
            )
        elif suffix == "weight" and value.dtype == torch.float8_e4m3fn:
            weights[key] = dequantize(
                x_q=value.to(torch.float32),
                scale=tensors[f"{module}.weight_scale"].to(torch.float32),
                args=args_by_bits[8],
                dtype=torch.float32,
            )
        elif suffix in (
            "weight_scale", "weight_global_scale", "input_global_scale", "input_scale", "k_scale", "v_scale"
        ):
            continue
        else:
            weights[key] = value.float()
    write_float32_reference(weights, source, reference)


def main(source: str, out: str, reference: str, scheme: str) -> None:
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    vocab = config.get_text_config().vocab_size
    # The model object of the checkpoint's own architecture: `oneshot(model=path)` loads AutoModelForCausalLM,
    # which refuses DiffusionGemma ("Unrecognized configuration class ... DiffusionGemmaConfig"); with a
    # model object llm-compressor also wants the tokenizer passed in.
    model = getattr(transformers, config.architectures[0]).from_pretrained(source, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Gemma 4's per-layer-embedding projections stay BF16: llm-compressor 0.14 sometimes calibrates
    # `per_layer_model_projection` to a ~0 weight global scale (3.5e-12, input global 1.8e31), which our
    # validator then rejects ("global scale is zero") -- see docs/checkpoint.md.
    # DiffusionGemma's vision tower stays BF16 as in NVIDIA's release (and as nvfp4-ext quantize keeps it).
    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*router.*", "re:.*per_layer.*", "re:.*vision.*"]
    preset = scheme.removesuffix("-KVFP8")
    kv_cache = {"kv_cache_scheme": dict(KV_CACHE_SCHEME)} if scheme.endswith("-KVFP8") else {}
    recipe = QuantizationModifier(targets="Linear", scheme=_recipe_scheme(preset), ignore=ignore, **kv_cache)
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=_calibration(vocab),
        num_calibration_samples=8,
        max_seq_length=32,
    )
    decisions = _decisions(model)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)

    write_reference(Path(source), Path(out), Path(reference))
    print(
        "PRODUCED="
        + json.dumps(
            {
                "out": out,
                "llmcompressor": llmcompressor.__version__,
                "compressed_tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__,
                "decisions": decisions,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    jobs = sys.argv[1:]
    if not jobs or len(jobs) % 4:
        raise SystemExit(__doc__)
    for i in range(0, len(jobs), 4):
        main(*jobs[i : i + 4])
