"""Checkpoints made by the producers themselves (ModelOpt `mtq.quantize` + `export_hf_checkpoint`,
llm-compressor `oneshot`) loaded into SGLang 0.5.23's own model classes with `--quantization nvfp4_ext`, on
CPU: greedy tokens equal transformers' on the weights the producer's own code dequantizes (tests/producers.py,
llm-compressor's compressed-tensors decompressor); no nvfp4_ext code builds or reads the reference.

SGLang's serving engine needs CUDA (or a CPU-built sgl-kernel that is not on PyPI), so the model runs in a
helper process (tests/sglang_producer_driver.py) through SGLang's loader (`get_model`), its model class's
`forward`, its torch-native attention backend and KV pools: one prefill, then one decode step per token. The
references are computed here, in a process SGLang never patched.

Which SGLang classes run (docs/sglang.md, "Producer checkpoints"):
  * Qwen3 (`Qwen3ForCausalLM`) and Qwen3-MoE (`Qwen3MoeForCausalLM`): ModelOpt W4A16, W4A4 (weight-only on
    CPU, so the reference is too), NVFP4+FP8 mixed, experts-only, MLP-only; llm-compressor NVFP4A16 / NVFP4.
  * Gemma 4 dense as Gemma-4-31B is published (`Gemma4ForConditionalGeneration`; full-attention head 512,
    sliding 32, SGLang's hybrid SWA KV pool) and as a text-only `Gemma4ForCausalLM` with one head size. A
    text-only Gemma 4 with two head sizes is written by transformers 5.19 with a `per_layer_config`, which
    SGLang's config parser refuses. SGLang accepts no CPU attention backend for Gemma 4 (its check names
    them), so Gemma 4 runs under a server config naming `triton` while the forward uses the torch-native
    backend.
  * Gemma 4 MoE (`Gemma4ForCausalLM`, one head size): SGLang's class asks for erf `gelu` experts, nvfp4_ext
    runs the gelu_tanh the config declares; the helper applies SGLang's router-norm scale on CPU as its CUDA
    branch does (tests/sglang_producer_driver.py).
  * DeepseekV3 (`DeepseekV3ForCausalLM`) as Kimi-K2 / DeepSeek-V3 are published: YaRN rope scaling and
    `moe_layer_freq` in the config (`kimi_like_deepseek`), ModelOpt NVFP4 on the MLPs and experts (attention
    bf16). SGLang's DeepseekV3 prefills through MHA on an MLA latent pool, which the torch-native backend
    cannot read, so the case asks for deterministic inference (absorbed MLA for prefill too; SGLang's check
    wants a named backend, so `triton` is named while the forward uses the torch-native backend).
  * Refused, with the exact error asserted: DeepseekV3 without rope scaling (SGLang's CPU rotary embedding
    takes only `deepseek_yarn` scaling), DeepseekV3 with an NVFP4 `kv_b_proj` (SGLang's absorbed MLA reads
    the packed FP4 `kv_b_proj.weight` as its `w_kc`), Qwen3.5 (SGLang's Mamba-cache check, then its config
    class reading `full_attention_interval`).
The default run covers W4A16, W4A4 and mixed once each, Gemma 4 MoE W4A16, llm-compressor NVFP4A16 and every
refusal (one SGLang process); `-m slow` / NVFP4_EXT_SLOW=1 adds the rest of the matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from producers import llmc_produce, modelopt_case, producer_state_file, selected_params
from test_vllm_helpers import MAX_TOKENS, PROMPTS, free_port, hf_greedy, tiny_checkpoint

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parents[1]

# (family, producer, recipe). "gemma4-multimodal": the tiny dense Gemma 4 as Gemma-4-31B is published
# (`multimodal_gemma4`); "gemma4-dense-uniform": a text-only Gemma 4 with one head size
# (`uniform_head_gemma4`).
DEFAULT_CASES = [
    ("qwen3-dense", "modelopt", "w4a16"),
    ("qwen3-moe", "modelopt", "nvfp4"),
    ("gemma4-multimodal", "modelopt", "mixed"),
    ("gemma4-moe-uniform", "modelopt", "w4a16"),
    ("qwen3-moe", "llmc", "NVFP4A16"),
]
SLOW_CASES = [
    ("qwen3-dense", "modelopt", "nvfp4"),
    ("qwen3-dense", "modelopt", "mixed"),
    ("qwen3-dense", "modelopt", "mlp-only"),
    ("qwen3-moe", "modelopt", "w4a16"),
    ("qwen3-moe", "modelopt", "mixed"),
    ("qwen3-moe", "modelopt", "experts-only"),
    ("qwen3-moe", "modelopt", "mlp-only"),
    ("gemma4-multimodal", "modelopt", "w4a16"),
    ("gemma4-multimodal", "modelopt", "nvfp4"),
    ("gemma4-dense-uniform", "modelopt", "w4a16"),
    ("gemma4-dense-uniform", "modelopt", "nvfp4"),
    ("gemma4-dense-uniform", "modelopt", "mixed"),
    ("qwen3-dense", "llmc", "NVFP4"),
    ("qwen3-dense", "llmc", "NVFP4A16"),
    ("qwen3-moe", "llmc", "NVFP4"),
    ("deepseek-v3-kimi", "modelopt", "mlp-only"),
]

# SGLang's DeepseekV3 prefills with MHA over an MLA latent pool unless deterministic inference asks for the
# absorbed MLA path, the one the torch-native backend computes (see the module docstring).
DEEPSEEK_ARGS = {"attention_backend": "triton", "enable_deterministic_inference": True}

# id -> (family, ModelOpt recipe, SGLang server arguments, (error type, start of the exact message, a line of
# the traceback that places it)). Each is the first thing that stops the checkpoint: SGLang's message or ours.
REFUSALS = {
    "gemma4-dense-per-layer-head-dim": (
        "gemma4-dense",
        "w4a16",
        {"attention_backend": "triton"},
        (
            "AmbiguousGlobalPerLayerAttributeError",
            "'head_dim' is a per-layer attribute and may vary across layers.",
            "sglang/srt/utils/hf_transformers/config.py",
        ),
    ),
    "gemma4-multimodal-torch-native-attention": (
        "gemma4-multimodal",
        "mixed",
        {"attention_backend": "torch_native"},
        (
            "AssertionError",
            "Gemma4 only supports trtllm_mha, triton, fa4, ascend, intel_xpu, intel_amx, or aiter attention "
            "backend, got prefill=torch_native, decode=torch_native",
            "sglang/srt/arg_groups/model_hook.py",
        ),
    ),
    "deepseek-v3-cpu-rope": (
        "deepseek-v3",
        "mlp-only",
        {},
        ("AssertionError", "", "assert rope_scaling is not None"),
    ),
    "deepseek-v3-kimi-nvfp4-kv-b-proj": (
        "deepseek-v3-kimi",
        "nvfp4",
        DEEPSEEK_ARGS,
        (
            "ConfigError",
            "layer model.layers.0.self_attn.kv_b_proj: an NVFP4 kv_b_proj is not supported under SGLang (its "
            "MLA reads the raw weight into w_kc/w_vc)",
            "nvfp4_ext/engines/sglang/config.py",
        ),
    ),
    "qwen3.5-mamba-cache": (
        "qwen3.5",
        "w4a16",
        {},
        (
            "AssertionError",
            "extra_buffer requires platform support for Mamba cache state snapshots.",
            "sglang/srt/arg_groups/mamba_hook.py",
        ),
    ),
    "qwen3.5-config-without-radix-cache": (
        "qwen3.5",
        "w4a16",
        {"disable_radix_cache": True},
        (
            "AttributeError",
            "'Qwen3_5TextConfig' object has no attribute 'full_attention_interval'",
            "sglang/srt/configs/qwen3_next.py",
        ),
    ),
}


def _id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


CASES = [pytest.param(c, id=_id(c)) for c in DEFAULT_CASES] + [
    pytest.param(c, id=_id(c), marks=pytest.mark.slow) for c in SLOW_CASES
]


def _gemma4_text_fields(root: Path, family: str) -> dict:
    """The text config of the project's tiny Gemma 4 (`family` "gemma4-dense" / "gemma4-moe") as constructor
    arguments, with the full-attention head size transformers 5.19 moved into `per_layer_config` taken back
    out as `global_head_dim`."""
    fields = json.loads((tiny_checkpoint(root, family, "source") / "config.json").read_text())
    for key in ("architectures", "dtype", "model_type", "transformers_version"):
        fields.pop(key, None)
    per_layer = fields.pop("per_layer_config", None) or {}
    fields["global_head_dim"] = next(iter(per_layer.values()), {}).get("head_dim", fields["head_dim"])
    return fields


def uniform_head_gemma4(root: Path, family: str) -> Path:
    """The project's tiny Gemma 4 text model with its full-attention layers given the sliding layers' head
    size (`global_head_dim` = `head_dim`), so transformers writes no per-layer override, which SGLang's parser
    refuses for a `gemma4_text` config; weights drawn afresh by transformers from the same seed."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from nvfp4_ext.tiny_models import write_tokenizer

    out = root / f"{family}-uniform" / "source"
    if out.is_dir():
        return out
    fields = _gemma4_text_fields(root, family)
    config = Gemma4TextConfig(**{**fields, "global_head_dim": fields["head_dim"]})
    config.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(0)
    Gemma4ForCausalLM(config).eval().to(torch.bfloat16).save_pretrained(out)
    write_tokenizer(out, config.vocab_size)
    assert not json.loads((out / "config.json").read_text()).get("per_layer_config")
    return out


def multimodal_gemma4(root: Path) -> Path:
    """The project's tiny dense Gemma 4 text stack (full-attention head 512, sliding 32) inside
    `Gemma4ForConditionalGeneration` with a one-layer vision tower: the form Gemma-4-31B is published in,
    whose `gemma4` config SGLang's parser flattens into a full and a sliding head shape. Embeddings tied at
    both config levels, as published (with the text config untied, SGLang leaves the `lm_head` that ModelOpt
    drops as a tied alias unloaded, and only logs it)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from nvfp4_ext.tiny_models import TINY_GEMMA4_VISION_CONFIG, write_tokenizer

    out = root / "gemma4-multimodal" / "source"
    if out.is_dir():
        return out
    text = {**_gemma4_text_fields(root, "gemma4-dense"), "tie_word_embeddings": True}
    vision = dict(TINY_GEMMA4_VISION_CONFIG)
    vocab = text["vocab_size"]  # image / begin-image / end-image: the top three word ids
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=vocab - 3,
        boi_token_id=vocab - 2,
        eoi_token_id=vocab - 1,
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(config).eval().to(torch.bfloat16).save_pretrained(out)
    write_tokenizer(out, vocab)
    return out


def kimi_like_deepseek(root: Path) -> Path:
    """The project's tiny DeepseekV3 with the config fields Kimi-K2 / DeepSeek-V3 are published with and the
    tiny config lacks: YaRN rope scaling (factor and original context scaled down to the tiny model's 512
    positions; beta_fast 32, beta_slow 1, mscale 1.0 as published), `moe_layer_freq` 1 and sigmoid scoring.
    Same weights (rope scaling has none)."""
    out = root / "deepseek-v3-kimi" / "source"
    if out.is_dir():
        return out
    shutil.copytree(tiny_checkpoint(root, "deepseek-v3", "source"), out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": config["rope_parameters"]["rope_theta"],
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    config.update(moe_layer_freq=1, scoring_func="sigmoid")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _source(root: Path, family: str) -> Path:
    if family == "deepseek-v3-kimi":
        return kimi_like_deepseek(root)
    if family == "gemma4-multimodal":
        return multimodal_gemma4(root)
    if family.endswith("-uniform"):
        return uniform_head_gemma4(root, family.removesuffix("-uniform"))
    return tiny_checkpoint(root, family, "source")


def _llmc_checkpoints(root: Path, cases: list[tuple]) -> dict[tuple, tuple[Path, Path, dict]]:
    """llm-compressor's checkpoints, compressed-tensors-dequantized references and llm-compressor's per-module
    decisions, one subprocess for all."""
    if not cases:
        return {}
    jobs, built = [], {}
    for family, _, scheme in cases:
        out, ref = root / family / f"llmc-{scheme}", root / family / f"llmc-{scheme}-dequantized"
        jobs.append((_source(root, family), out, ref, scheme))
        built[(family, "llmc", scheme)] = (out, ref)
    produced = {out: info["decisions"] for out, info in llmc_produce(jobs).items()}
    return {case: (out, ref, produced[str(out)]) for case, (out, ref) in built.items()}


def _selected(request, param: str) -> list:
    return sorted(selected_params(request, __name__, param))


@pytest.fixture(scope="session")
def sglang_runs(tmp_path_factory, request) -> dict:
    """Every selected case and refusal through SGLang in one helper process: id -> the helper's result, plus
    each case's transformers reference tokens."""
    root = tmp_path_factory.mktemp("sglang_producers")
    cases, refusals = _selected(request, "case"), _selected(request, "refusal")
    built = _llmc_checkpoints(root, [case for case in cases if case[1] == "llmc"])
    for case in cases:
        if case[1] == "modelopt":
            made = modelopt_case(_source(root, case[0]), root / case[0], case[2])
            decisions = json.loads(producer_state_file(made["export"]).read_text())
            built[case] = (made["export"], made["reference"], decisions)
    from transformers import AutoTokenizer

    manifest, references, decisions = [], {}, {}
    for case, (checkpoint, reference, decided) in built.items():
        decisions[_id(case)] = decided
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        manifest.append(
            {
                "id": _id(case),
                "path": str(checkpoint),
                "prompts": [tokenizer(prompt).input_ids for prompt in PROMPTS],
                "max_tokens": MAX_TOKENS,
                # SGLang's argument check accepts no CPU attention backend for Gemma 4 (see REFUSALS).
                "server_args": DEEPSEEK_ARGS
                if case[0].startswith("deepseek")
                else {"attention_backend": "triton" if "gemma4" in case[0] else "torch_native"},
            }
        )
        references[_id(case)] = hf_greedy(reference, PROMPTS)
    for name in refusals:
        family, recipe, args, _ = REFUSALS[name]
        export = modelopt_case(_source(root, family), root / family, recipe)["export"]
        # One token of one prompt: some refusals (DeepseekV3's NVFP4 kv_b_proj) come at the first forward.
        prompt = AutoTokenizer.from_pretrained(export)(PROMPTS[0]).input_ids
        manifest.append(
            {"id": name, "path": str(export), "prompts": [prompt], "max_tokens": 1, "server_args": args}
        )
    manifest_file, results_file = root / "manifest.json", root / "results.json"
    manifest_file.write_text(json.dumps(manifest))
    driver = REPO / "tests" / "sglang_producer_driver.py"
    proc = subprocess.run(
        [sys.executable, str(driver), str(manifest_file), str(results_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(free_port())},
    )
    assert proc.returncode == 0 and results_file.exists(), (proc.stdout + proc.stderr)[-6000:]
    results = json.loads(results_file.read_text())
    return {"results": results, "references": references, "decisions": decisions}


@pytest.mark.parametrize("case", CASES)
def test_sglang_model_class_decodes_producer_checkpoint_like_producer_dequantized_model(case, sglang_runs):
    family, producer, recipe = case
    result = sglang_runs["results"][_id(case)]
    assert "error" not in result, result.get("error", {}).get("traceback")
    expected_class = {
        "qwen3-dense": "Qwen3ForCausalLM",
        "qwen3-moe": "Qwen3MoeForCausalLM",
        "gemma4-multimodal": "Gemma4ForConditionalGeneration",
        "deepseek-v3-kimi": "DeepseekV3ForCausalLM",
    }
    assert result["model_class"] == expected_class.get(family, "Gemma4ForCausalLM")
    # The quant methods SGLang built follow the producer's own per-module decisions.
    methods, decided = set(result["methods"]), sglang_runs["decisions"][_id(case)]
    assert not any("ModelOpt" in m or "CompressedTensors" in m for m in methods), methods
    experts = {scheme for name, scheme in decided.items() if ".experts." in name}
    linears = {scheme for name, scheme in decided.items() if ".experts." not in name}
    assert ("Nvfp4ExtMoEMethod" in methods) == bool(experts), methods
    assert ("Nvfp4ExtLinearMethod" in methods) == bool(linears & {"nvfp4", "nvfp4_w4a16"}), methods
    assert ("Nvfp4ExtFp8LinearMethod" in methods) == ("fp8" in linears), methods
    assert result["tokens"] == sglang_runs["references"][_id(case)]


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_what_sglang_on_cpu_refuses_is_named(refusal, sglang_runs):
    """Each family SGLang ships a class for but cannot run here on CPU stops with this exact error."""
    error_type, message, where = REFUSALS[refusal][3]
    error = sglang_runs["results"][refusal].get("error")
    assert error is not None, f"{refusal} now loads: move it to the greedy cases"
    assert error["type"] == error_type, error["traceback"]
    assert error["message"].startswith(message) if message else error["message"] == "", error["traceback"]
    assert where in error["traceback"], error["traceback"]
