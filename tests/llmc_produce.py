"""Run inside the llm-compressor venv (`.venv/llmc`, built by scripts/install.sh): make a compressed-tensors
NVFP4 checkpoint with llm-compressor's `oneshot` and a float32 reference dequantized by compressed-tensors
itself.

    .venv/llmc/bin/python tests/llmc_produce.py SOURCE_DIR OUT_DIR REFERENCE_DIR SCHEME [...]

SCHEME is an llm-compressor preset ("NVFP4" = W4A4, "NVFP4A16" = weight-only). The calibration set is a few
deterministic random token sequences (the tiny models' word vocabulary has no natural text). The reference is
compressed-tensors' own NVFP4 dequantization of every packed weight (`write_reference`), saved in float32.
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


def _decisions(model: torch.nn.Module) -> dict[str, str]:
    """module name -> "nvfp4" (weights and input activations FP4) or "nvfp4_w4a16", from each module's
    `quantization_scheme` (what llm-compressor attached and compressed-tensors serialises)."""
    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        weights = scheme.weights
        if weights.num_bits != 4 or weights.type != "float" or weights.group_size != 16:
            raise SystemExit(f"unexpected weight scheme on {name}: {weights}")
        acts = scheme.input_activations
        out[name] = "nvfp4" if acts is not None and acts.num_bits == 4 else "nvfp4_w4a16"
    return out


def write_reference(source: Path, out: Path, reference: Path) -> None:
    """A float32 HF checkpoint of `out`: every `weight_packed` dequantized by compressed-tensors' own NVFP4
    functions (`unpack_fp4_from_uint8` + `dequantize` with the checkpoint's QuantizationArgs, the steps of
    `NVFP4PackedCompressor.decompress`, run in float32 rather than its bf16 default so no rounding is added),
    the source's config and tokenizer."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    sys.path.insert(0, str(Path(__file__).parent))
    from producers import read_tensors, write_float32_reference

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = list(qcfg["config_groups"].values())
    if len(groups) != 1:
        raise SystemExit(f"expected one config group, got {len(groups)}")
    args = QuantizationArgs.model_validate(groups[0]["weights"])
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
                args=args,
                global_scale=tensors[f"{module}.weight_global_scale"].to(torch.float32),
                dtype=torch.float32,
            )
        elif suffix in ("weight_scale", "weight_global_scale", "input_global_scale"):
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
    # Gemma 4's per-layer-embedding projections stay BF16: llm-compressor 0.14 sometimes calibrates
    # `per_layer_model_projection` to a ~0 weight global scale (3.5e-12, input global 1.8e31), which our
    # validator then rejects ("global scale is zero") -- see docs/checkpoint.md.
    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*router.*", "re:.*per_layer.*"]
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)
    model = oneshot(
        model=source,
        recipe=recipe,
        dataset=_calibration(vocab),
        num_calibration_samples=8,
        max_seq_length=32,
    )
    decisions = _decisions(model)
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)

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
