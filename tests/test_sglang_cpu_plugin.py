"""SGLang plugin on CPU: entry-point registration, `--quantization nvfp4_ext` parsing and checkpoint claiming,
and the NVFP4 DiffusionGemma model class built on CPU, loaded from a tiny NVFP4 checkpoint and checked
against the format reference.

Runs only inside the SGLang subprocess started by tests/test_sglang_isolated.py: importing SGLang patches
transformers globally, which must not leak into the other tests' process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch

if os.environ.get("NVFP4_EXT_SGLANG_CHILD") != "1":
    pytest.skip("runs in the SGLang subprocess of test_sglang_isolated.py", allow_module_level=True)

from nvfp4_ext.engines.sglang.cpu_support import prepare_cpu_import  # noqa: E402

prepare_cpu_import()
pytest.importorskip("sglang")

from test_sglang_checkpoints import EXCLUDE, quantize_tiny_checkpoint  # noqa: E402
from tolerances import assert_within_rounding, linear_terms  # noqa: E402

from nvfp4_ext.errors import CheckpointError, ConfigError  # noqa: E402
from nvfp4_ext.format import dequantize_nvfp4, stored_global_scale  # noqa: E402
from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma, build_tiny_qwen3_moe  # noqa: E402

pytestmark = pytest.mark.sglang
ARCH = "DiffusionGemmaForBlockDiffusion"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def plugins_loaded() -> None:
    """SGLang's own plugin loader, as every SGLang process runs it (finds us through the entry point)."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sglang_ckpt")
    bf16 = build_tiny_diffusion_gemma(root / "bf16", hidden_size=64, num_layers=2, vocab_size=512)
    nvfp4 = quantize_tiny_checkpoint(bf16, root / "nvfp4")
    # The same checkpoint described in compressed-tensors form (config only: claiming reads no tensors).
    ct = root / "ct"
    shutil.copytree(nvfp4, ct)
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "float", "group_size": 16, "strategy": "tensor_group"},
                "input_activations": {
                    "num_bits": 4,
                    "type": "float",
                    "group_size": 16,
                    "strategy": "tensor_group",
                    "dynamic": "local",
                },
                "format": "nvfp4-pack-quantized",
            }
        },
        "ignore": EXCLUDE,
    }
    (ct / "config.json").write_text(json.dumps(config))
    return {"bf16": bf16, "nvfp4": nvfp4, "ct": ct}


@pytest.fixture(scope="module")
def distributed(checkpoints) -> None:
    """A world-size-1 gloo group: SGLang's parallel layers need one even at TP=1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29653", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    if not torch.distributed.is_initialized():
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
    if not parallel_state.model_parallel_is_initialized():
        reset_context()
        publish(
            ServerArgs(model_path=str(checkpoints["nvfp4"]), device="cpu"),
            role="test",
            ranks=SpawnRanks(world_rank=0),
        )
        get_parallel().override_permanently(world_group=parallel_state._WORLD)
        parallel_state.initialize_model_parallel(backend="gloo")


def _build_and_load(path):
    """What SGLang's loader does on one rank: resolve the class, build it with the quant config from the
    checkpoint, load every tensor, then post-process every quantized layer."""
    from safetensors.torch import load_file
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config
    from sglang.srt.models.registry import ModelRegistry

    model_config = ModelConfig(str(path), quantization="nvfp4_ext")
    model_cls, _ = ModelRegistry.resolve_model_cls(model_config.hf_config.architectures)
    quant_config = get_quant_config(model_config, LoadConfig(), model_cls.packed_modules_mapping)
    model = model_cls(model_config.hf_config, quant_config=quant_config)
    tensors = load_file(str(path / "model.safetensors"))
    loaded = model.load_weights(tensors.items())
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
    return model, tensors, loaded


@pytest.fixture(scope="module")
def loaded_model(plugins_loaded, distributed, checkpoints):
    """The registered DiffusionGemma class built on CPU with our config, and the checkpoint's tensors."""
    return _build_and_load(checkpoints["nvfp4"])


@pytest.fixture(scope="module")
def compressed_tensors_model(plugins_loaded, distributed, checkpoints, tmp_path_factory):
    """The same weights as a compressed-tensors checkpoint: `weight_packed`, and global scales stored as
    divisors (`weight_global_scale` = 1 / ModelOpt's `weight_scale_2`)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("ct_full")
    shutil.copytree(checkpoints["ct"], root, dirs_exist_ok=True)
    renamed = {}
    for name, tensor in load_file(str(checkpoints["nvfp4"] / "model.safetensors")).items():
        for modelopt, ct in (
            (".weight_scale_2", ".weight_global_scale"),
            (".input_scale", ".input_global_scale"),
        ):
            if name.endswith(modelopt):
                name, tensor = name[: -len(modelopt)] + ct, stored_global_scale(tensor, "compressed_tensors")
        if tensor.dtype == torch.uint8:
            name = name[: -len(".weight")] + ".weight_packed"
        renamed[name] = tensor
    save_file(renamed, str(root / "model.safetensors"), metadata={"format": "pt"})
    return _build_and_load(root)


@pytest.fixture(scope="module")
def qwen3_moe(plugins_loaded, distributed, tmp_path_factory: pytest.TempPathFactory):
    """SGLang's own Qwen3-MoE class (silu experts, SGLang's standard expert loader) on a tiny NVFP4 copy."""
    root = tmp_path_factory.mktemp("qwen3_moe")
    path = quantize_tiny_checkpoint(build_tiny_qwen3_moe(root / "bf16", dtype=torch.float32), root / "nvfp4")
    model, tensors, _ = _build_and_load(path)
    return model, tensors


# ---------------------------------------------------------------------------------------------- registration
def test_entry_point_registers_everything(plugins_loaded) -> None:
    from sglang.srt.dllm.algorithm import get_algorithm_cls
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.server_args import QUANTIZATION_CHOICES

    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.sglang.dllm import Gemma4Renoise
    from nvfp4_ext.engines.sglang.model import DiffusionGemmaForBlockDiffusion
    from nvfp4_ext.engines.sglang.registration import registered

    assert registered()
    assert QUANTIZATION_CHOICES.count("nvfp4_ext") == 1
    assert next(iter(QUANTIZATION_METHODS)) == "nvfp4_ext"
    assert QUANTIZATION_METHODS["nvfp4_ext"] is Nvfp4ExtConfig
    assert get_algorithm_cls("Gemma4Renoise") is Gemma4Renoise
    assert ModelRegistry.models[ARCH] is DiffusionGemmaForBlockDiffusion
    assert DiffusionGemmaForBlockDiffusion.__name__ == ARCH  # SGLang matches processors by class name


def test_register_is_idempotent(plugins_loaded) -> None:
    from sglang.srt.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS
    from sglang.srt.server_args import QUANTIZATION_CHOICES

    from nvfp4_ext.engines.sglang import register, registration

    before = (list(QUANTIZATION_METHODS), list(QUANTIZATION_CHOICES), list(WEIGHT_LOADER_V2_SUPPORTED))
    register()
    registration._REGISTERED = False  # force every step to run again: each must be a no-op the second time
    register()
    after = (list(QUANTIZATION_METHODS), list(QUANTIZATION_CHOICES), list(WEIGHT_LOADER_V2_SUPPORTED))
    assert after == before


@pytest.mark.parametrize("version", ["0.5.22", "0.5.24", "0.6.0"])
def test_untested_sglang_stops_startup_with_one_message(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """Through SGLang's own plugin loader, which logs and swallows a plugin's exceptions: we must exit."""
    import sglang.srt.plugins as sglang_plugins
    import sglang.version

    from nvfp4_ext.engines.sglang import registration

    monkeypatch.setattr(sglang.version, "__version__", version)
    monkeypatch.setattr(registration, "_REGISTERED", False)
    monkeypatch.setattr(sglang_plugins, "_plugins_loaded", False)
    with pytest.raises(SystemExit) as info:
        sglang_plugins.load_plugins()
    assert str(info.value) == (
        f"error: nvfp4_ext supports SGLang >=0.5.23,<0.5.24 (tested versions); found SGLang {version!r}. "
        'Install a supported version, e.g. `pip install "nvfp4-ext[sglang]"`.'
    )
    assert not registration.registered()


@pytest.mark.parametrize(
    "whitelist, expected", [("some_other_plugin", False), ("nvfp4_ext", True), ("", True)]
)
def test_sglang_plugins_whitelist(monkeypatch: pytest.MonkeyPatch, whitelist: str, expected: bool) -> None:
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    from nvfp4_ext.engines.sglang import register

    monkeypatch.setenv("SGLANG_PLUGINS", whitelist)
    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert ("nvfp4_ext" in found) is expected
    if expected:
        assert found["nvfp4_ext"][0] is register


def test_cli_accepts_quantization_nvfp4_ext(plugins_loaded, checkpoints) -> None:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(
        [
            "--model-path",
            str(checkpoints["nvfp4"]),
            "--quantization",
            "nvfp4_ext",
            "--dllm-algorithm",
            "Gemma4Renoise",
        ]
    )
    assert args.quantization == "nvfp4_ext"
    assert args.dllm_algorithm == "Gemma4Renoise"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "x", "--quantization", "nvfp4_not_registered"])


# ------------------------------------------------------------------------------------------------ claiming
@pytest.mark.parametrize(
    "ckpt, requested, resolved",
    [
        ("nvfp4", "nvfp4_ext", "nvfp4_ext"),
        ("nvfp4", None, "modelopt_fp4"),  # users who did not ask keep SGLang's choice
        ("nvfp4", "modelopt_fp4", "modelopt_fp4"),
        ("ct", "nvfp4_ext", "nvfp4_ext"),
        ("ct", None, "compressed-tensors"),
    ],
)
def test_config_claims_checkpoint_only_when_asked(
    plugins_loaded, checkpoints, ckpt, requested, resolved
) -> None:
    from sglang.srt.configs.model_config import ModelConfig

    assert ModelConfig(str(checkpoints[ckpt]), quantization=requested).quantization == resolved


def test_unquantized_checkpoint_is_not_claimed(plugins_loaded) -> None:
    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig

    assert Nvfp4ExtConfig.override_quantization_method(None, "nvfp4_ext") is None
    fp8_only = {"quant_method": "modelopt", "quant_algo": "FP8"}
    assert Nvfp4ExtConfig.override_quantization_method(fp8_only, "nvfp4_ext") is None
    nvfp4 = {"quant_method": "modelopt_fp4", "quant_algo": "NVFP4"}
    assert Nvfp4ExtConfig.override_quantization_method(nvfp4, "nvfp4_ext") == "nvfp4_ext"
    assert Nvfp4ExtConfig.override_quantization_method(nvfp4, "modelopt_fp4") is None


def test_get_quant_config_parses_checkpoint(plugins_loaded, checkpoints) -> None:
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config

    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.sglang.weight_names import hf_module_name

    config = get_quant_config(
        ModelConfig(str(checkpoints["nvfp4"]), quantization="nvfp4_ext"),
        LoadConfig(),
        {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
    )
    assert isinstance(config, Nvfp4ExtConfig)
    config.module_name_mapper = hf_module_name
    assert config.linear_scheme("model.layers.0.self_attn.qkv_proj") == "nvfp4"
    assert config.linear_scheme("model.layers.0.router.proj") == "unquantized"
    assert config.moe_scheme("model.layers.1.moe.experts") == "nvfp4"


# ------------------------------------------------------------------------------------------- model loading
def test_model_consumes_every_tensor(loaded_model) -> None:
    from nvfp4_ext.engines.sglang.linear import Nvfp4ExtLinearMethod
    from nvfp4_ext.engines.sglang.moe import Nvfp4ExtMoEMethod

    model, tensors, loaded = loaded_model
    params = {name for name, _ in model.named_parameters()}
    optional = {name for name in params if name.endswith("input_scale")}
    assert params - optional <= loaded
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj.quant_method, Nvfp4ExtLinearMethod)
    assert isinstance(layer.moe.experts.quant_method, Nvfp4ExtMoEMethod)
    assert not hasattr(layer.router.proj, "weight_scale")  # excluded by the checkpoint: BF16
    assert len(tensors) > len(params) // 2  # per-expert tensors: many checkpoint tensors per parameter


def test_unexpected_tensor_is_refused(loaded_model) -> None:
    model, tensors, _ = loaded_model
    extra = {"model.decoder.layers.0.mlp.gate_proj.bogus_scale": torch.ones(1)}
    with pytest.raises(CheckpointError, match="bogus_scale"):
        model.load_weights(extra.items())


def test_missing_expert_scale_is_named(loaded_model) -> None:
    model, tensors, _ = loaded_model
    experts = model.model.layers[0].moe.experts
    saved = experts.w13_weight_scale_2.data.clone()
    try:
        experts.w13_weight_scale_2.data[3, 1] = float(
            "nan"
        )  # as if experts.3.up_proj.weight_scale_2 were absent
        with pytest.raises(CheckpointError, match=r"w13_weight_scale_2.*index 3|index 3.*w13_weight_scale_2"):
            experts.quant_method.process_weights_after_loading(experts)
    finally:
        experts.w13_weight_scale_2.data.copy_(saved)
        experts.quant_method.process_weights_after_loading(experts)


def _dequant(tensors: dict, prefix: str) -> torch.Tensor:
    return dequantize_nvfp4(
        tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.weight_scale_2"]
    ).float()


def test_fused_qkv_matches_checkpoint_shards(loaded_model) -> None:
    """Layer 1 is full attention: q and k from the checkpoint, v = k (k_eq_v), each shard with its own
    global scale."""
    model, tensors, _ = loaded_model
    qkv = model.model.layers[1].self_attn.qkv_proj
    base = "model.decoder.layers.1.self_attn"
    torch.manual_seed(0)
    x = torch.randn(5, qkv.input_size, dtype=torch.float32)
    k = _dequant(tensors, f"{base}.k_proj")
    expected = x @ torch.cat([_dequant(tensors, f"{base}.q_proj"), k, k]).t()
    terms = linear_terms(x, torch.cat([_dequant(tensors, f"{base}.q_proj"), k, k]))
    assert_within_rounding(qkv.quant_method.apply(qkv, x), expected, terms)


def _routed_reference(
    x, topk_weights, topk_ids, tensors, base: str, activation, magnitude: bool = False
) -> torch.Tensor:
    """Per token and route: down(act(gate x) * up x) from the checkpoint's own NVFP4 tensors.

    With `magnitude`, the same sums over absolute values in fp64 (|silu(v)|, |gelu(v)| <= |v|): the size of
    the terms an fp32 result sums, which bounds its rounding error whatever the summation order.
    """
    weight = lambda name: _dequant(tensors, name)  # noqa: E731
    if magnitude:
        x, topk_weights = x.double().abs(), topk_weights.double().abs()
        weight = lambda name: _dequant(tensors, name).double().abs()  # noqa: E731
        activation = lambda v: v  # noqa: E731
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e < 0:  # dropped by expert parallelism: contributes nothing
                continue
            gate = x[t] @ weight(f"{base}.{e}.gate_proj").t()
            up = x[t] @ weight(f"{base}.{e}.up_proj").t()
            down = weight(f"{base}.{e}.down_proj")
            expected[t] += topk_weights[t, j] * ((activation(gate) * up) @ down.t())
    return expected


def _run_experts(experts, x, topk_weights, topk_ids) -> torch.Tensor:
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatchOutput
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    dispatch = StandardDispatchOutput(x, None, StandardTopKOutput(topk_weights, topk_ids, None))
    return experts.quant_method.apply(experts, dispatch).hidden_states


def test_gelu_tanh_experts_match_checkpoint(loaded_model) -> None:
    model, tensors, _ = loaded_model
    experts = model.model.layers[0].moe.experts
    assert experts.quant_method.activation == "gelu_tanh"
    torch.manual_seed(1)
    x = torch.randn(6, experts.hidden_size, dtype=torch.float32)
    topk_ids = torch.tensor([[0, 3], [1, 2], [7, 0], [5, 6], [2, 4], [3, -1]], dtype=torch.int32)
    topk_weights = torch.rand(6, 2, dtype=torch.float32)
    base = "model.decoder.layers.0.experts"
    expected = _routed_reference(
        x, topk_weights, topk_ids, tensors, base, lambda v: torch.nn.functional.gelu(v, approximate="tanh")
    )
    terms = _routed_reference(x, topk_weights, topk_ids, tensors, base, None, magnitude=True)
    assert_within_rounding(_run_experts(experts, x, topk_weights, topk_ids), expected, terms)


def test_compressed_tensors_checkpoint_computes_the_same(loaded_model, compressed_tensors_model) -> None:
    """Same weights, other naming and global-scale convention: the same layer outputs."""
    modelopt, tensors, _ = loaded_model
    ct, ct_tensors, ct_loaded = compressed_tensors_model
    assert "model.layers.0.moe.experts.w13_weight_packed" in ct_loaded
    torch.manual_seed(4)
    x = torch.randn(4, modelopt.model.layers[1].self_attn.qkv_proj.input_size)
    q, k = (_dequant(tensors, f"model.decoder.layers.1.self_attn.{p}_proj") for p in "qk")
    down = _dequant(tensors, "model.decoder.layers.0.mlp.down_proj")
    for pick, weight in (
        (lambda m: m.model.layers[1].self_attn.qkv_proj, torch.cat([q, k, k])),
        (lambda m: m.model.layers[0].mlp.down_proj, down),
    ):
        a, b = pick(modelopt), pick(ct)
        xa = x if a.input_size == x.shape[1] else torch.randn(4, a.input_size)
        # global scales stored as divisors round differently: the weights may differ in the last bit
        out_a, out_b = a.quant_method.apply(a, xa), b.quant_method.apply(b, xa)
        assert_within_rounding(out_b, out_a, linear_terms(xa, weight))
    topk_ids = torch.tensor([[0, 5], [2, 7], [1, 3], [6, 4]], dtype=torch.int32)
    topk_weights = torch.rand(4, 2)
    experts_a, experts_b = modelopt.model.layers[1].moe.experts, ct.model.layers[1].moe.experts
    terms = _routed_reference(
        x, topk_weights, topk_ids, tensors, "model.decoder.layers.1.experts", None, magnitude=True
    )
    out_a = _run_experts(experts_a, x, topk_weights, topk_ids)
    assert_within_rounding(_run_experts(experts_b, x, topk_weights, topk_ids), out_a, terms)


def test_silu_experts_through_sglang_loader_match_checkpoint(qwen3_moe) -> None:
    model, tensors = qwen3_moe
    experts = model.model.layers[1].mlp.experts
    assert experts.quant_method.activation == "silu"
    torch.manual_seed(2)
    x = torch.randn(5, experts.hidden_size, dtype=torch.float32)
    topk_ids = torch.randint(0, experts.num_experts, (5, 2), dtype=torch.int32)
    topk_weights = torch.rand(5, 2, dtype=torch.float32)
    base = "model.layers.1.mlp.experts"
    expected = _routed_reference(x, topk_weights, topk_ids, tensors, base, torch.nn.functional.silu)
    terms = _routed_reference(x, topk_weights, topk_ids, tensors, base, None, magnitude=True)
    assert_within_rounding(_run_experts(experts, x, topk_weights, topk_ids), expected, terms)


# ------------------------------------------------------------------------------------ mixed-precision linears
@pytest.mark.parametrize("granularity, algo", [("tensor", "FP8"), ("block", "FP8_PB_WO"), ("nvfp4", "NVFP4")])
def test_mixed_checkpoint_fused_qkv_matches_shards(
    plugins_loaded, distributed, granularity: str, algo: str
) -> None:
    """A fused q/k/v layer of a MIXED_PRECISION checkpoint loads shard by shard through SGLang's v2 loaders
    and computes what the three checkpoint shards compute, each with its own scale."""
    from sglang.srt.layers.linear import QKVParallelLinear

    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig
    from nvfp4_ext.format import dequantize_fp8, quantize_fp8, quantize_nvfp4

    config = Nvfp4ExtConfig.from_config(
        {
            "quant_method": "modelopt",
            "quant_algo": "MIXED_PRECISION",
            "quantized_layers": {
                **{f"blk.attn.{p}": {"quant_algo": algo} for p in ("q_proj", "k_proj", "v_proj")},
                "blk.experts.0.gate_proj": {"quant_algo": "NVFP4"},
            },
            "packed_modules_mapping": {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
        }
    )
    layer = QKVParallelLinear(
        hidden_size=128,
        head_size=128,
        total_num_heads=2,
        total_num_kv_heads=1,
        bias=False,
        params_dtype=torch.float32,
        quant_config=config,
        prefix="blk.attn.qkv_proj",
    )
    torch.manual_seed(3)
    shards, dequantized = {}, []
    # Shards of 256/128/128 rows: whole 128x128 FP8 blocks, as in real models.
    for shard, rows in (("q", 256), ("k", 128), ("v", 128)):
        # Different ranges per shard, so each shard gets its own scales.
        w = torch.randn(rows, 128) * (1 + "qkv".index(shard))
        if granularity == "nvfp4":
            q = quantize_nvfp4(w)
            shards[shard] = {
                "weight": q.qdata,
                "weight_scale": q.scale,
                "weight_scale_2": q.global_scale.reshape(()),
                "input_scale": torch.tensor(0.01),
            }
            dequantized.append(dequantize_nvfp4(q.qdata, q.scale, q.global_scale).float())
        else:
            qw, scale = quantize_fp8(w, granularity)
            scale = scale.reshape(()) if granularity == "tensor" else scale
            shards[shard] = {"weight": qw, "weight_scale": scale, "input_scale": torch.tensor(0.01)}
            dequantized.append(dequantize_fp8(qw, scale))
    for shard, tensors in shards.items():
        for name, tensor in tensors.items():
            layer.weight_loader_v2(getattr(layer, name), tensor, shard)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 128)
    expected = x @ torch.cat(dequantized).t()
    terms = linear_terms(x, torch.cat(dequantized))
    assert_within_rounding(layer.quant_method.apply(layer, x), expected, terms)


def test_fp8_block_shards_off_the_block_grid_are_refused(plugins_loaded, distributed) -> None:
    from sglang.srt.layers.linear import QKVParallelLinear

    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig
    from nvfp4_ext.errors import ConfigError

    config = Nvfp4ExtConfig.from_config(
        {
            "quant_method": "modelopt",
            "quant_algo": "MIXED_PRECISION",
            "quantized_layers": {
                **{f"blk.attn.{p}": {"quant_algo": "FP8_PB_WO"} for p in ("q_proj", "k_proj", "v_proj")},
                "blk.experts.0.gate_proj": {"quant_algo": "NVFP4"},
            },
        }
    )
    with pytest.raises(ConfigError, match=r"blk\.attn\.qkv_proj.*128x128"):
        QKVParallelLinear(
            hidden_size=64,
            head_size=32,
            total_num_heads=2,
            total_num_kv_heads=1,
            bias=False,
            params_dtype=torch.float32,
            quant_config=config,
            prefix="blk.attn.qkv_proj",
        )


def _tiny_expert_checkpoint(experts: int, hidden: int, inter: int) -> dict:
    """Per-expert NVFP4 gate/up/down tensors as a ModelOpt export stores them, keyed by (expert, proj)."""
    from nvfp4_ext.format import quantize_nvfp4

    torch.manual_seed(5)
    ckpt = {}
    for e in range(experts):
        for proj, shape in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            q = quantize_nvfp4(torch.randn(shape) * (e + 1))
            ckpt[(e, proj)] = {
                "weight": q.qdata,
                "weight_scale": q.scale,
                "weight_scale_2": q.global_scale.reshape(()),
            }
    return ckpt


def _load_expert_layer(ckpt: dict, experts: int, hidden: int, inter: int, tp_size: int = 1, rank: int = 0,
                       routed_scaling_factor: float | None = None) -> torch.nn.Module:
    """Our SGLang MoE method on a bare module, loaded through its own weight loaders (rank's TP slice)."""
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.sglang.moe import Nvfp4ExtMoEMethod

    config = Nvfp4ExtConfig.from_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})
    layer = torch.nn.Module()
    layer.moe_tp_rank = rank
    method = Nvfp4ExtMoEMethod(config, "nvfp4_w4a16", f"experts.tp{tp_size}.rank{rank}")
    method.create_weights(
        layer, experts, hidden, inter // tp_size, torch.float32, moe_intermediate_size=inter
    )
    method.create_moe_runner(
        layer, MoeRunnerConfig(activation="silu", is_gated=True, routed_scaling_factor=routed_scaling_factor)
    )
    shard_of = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for (e, proj), tensors in ckpt.items():
        prefix = "w2" if proj == "down_proj" else "w13"
        for suffix, tensor in tensors.items():
            param = getattr(layer, f"{prefix}_{suffix}")
            param.weight_loader(param, tensor, f"{prefix}_{suffix}", shard_of[proj], e)
    method.process_weights_after_loading(layer)
    layer.quant_method = method
    return layer


def test_moe_tensor_parallel_shards_sum_to_the_full_layer(plugins_loaded) -> None:
    """Two TP ranks load their slices of the intermediate dimension from full checkpoint tensors; the sum
    of their outputs (SGLang's all-reduce) equals the unsplit layer's output."""
    experts, hidden, inter = 4, 64, 64
    ckpt = _tiny_expert_checkpoint(experts, hidden, inter)
    named = {f"experts.{e}.{proj}.{k}": v for (e, proj), t in ckpt.items() for k, v in t.items()}

    def build(tp_size: int, rank: int):
        return _load_expert_layer(ckpt, experts, hidden, inter, tp_size, rank)

    x = torch.randn(5, hidden)
    topk_ids = torch.randint(0, experts, (5, 2), dtype=torch.int32)
    topk_weights = torch.rand(5, 2)
    full = _run_experts(build(1, 0), x, topk_weights, topk_ids)
    split = sum(_run_experts(build(2, rank), x, topk_weights, topk_ids) for rank in (0, 1))
    terms = _routed_reference(x, topk_weights, topk_ids, named, "experts", None, magnitude=True)
    assert_within_rounding(split, full, terms)
    assert full.abs().max() > 0


@pytest.mark.parametrize("on_cuda", [False, True], ids=["cpu-model-scales", "cuda-method-scales"])
def test_routed_scaling_factor_is_applied_once(plugins_loaded, monkeypatch, on_cuda: bool) -> None:
    """SGLang's DeepseekV2MoE multiplies the experts' output by routed_scaling_factor itself only off CUDA;
    on CUDA its Triton runner does it in the expert sum. Our method must do what the runner does there
    and nothing on CPU, so DeepseekV3/Kimi experts are scaled exactly once on both."""
    import sglang.srt.utils as sglang_utils

    monkeypatch.setattr(sglang_utils, "is_cuda", lambda: on_cuda)
    experts, hidden, inter = 4, 64, 64
    ckpt = _tiny_expert_checkpoint(experts, hidden, inter)
    x = torch.randn(5, hidden)
    topk_ids = torch.randint(0, experts, (5, 2), dtype=torch.int32)
    topk_weights = torch.rand(5, 2)
    plain = _run_experts(_load_expert_layer(ckpt, experts, hidden, inter), x, topk_weights, topk_ids)
    scaled = _run_experts(
        _load_expert_layer(ckpt, experts, hidden, inter, routed_scaling_factor=2.5), x, topk_weights, topk_ids
    )
    assert plain.abs().max() > 0
    torch.testing.assert_close(scaled, plain * 2.5 if on_cuda else plain, rtol=0, atol=0)


def test_bf16_checkpoint_loads_as_upstream(plugins_loaded, distributed, checkpoints) -> None:
    """Without --quantization the replacement class is upstream's: same parameters, same loaded set."""
    from safetensors.torch import load_file
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.models.gemma4_diffusion import DiffusionGemmaForBlockDiffusion as Upstream

    from nvfp4_ext.engines.sglang.model import DiffusionGemmaForBlockDiffusion

    hf_config = ModelConfig(str(checkpoints["bf16"])).hf_config
    ours, theirs = DiffusionGemmaForBlockDiffusion(hf_config), Upstream(hf_config)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    tensors = load_file(str(checkpoints["bf16"] / "model.safetensors"))
    assert ours.load_weights(tensors.items()) == theirs.load_weights(tensors.items())
    experts_ours, experts_theirs = ours.model.layers[0].moe.experts, theirs.model.layers[0].moe.experts
    assert torch.equal(experts_ours.w13_weight, experts_theirs.w13_weight)


# ------------------------------------------------------------------------------------- expert activation
def _gemma4_hf_config(hidden_activation: str, multimodal: bool):
    """A transformers Gemma 4 config, as SGLang's `get_quant_config` hands it to `from_config`."""
    from transformers import Gemma4Config, Gemma4TextConfig

    text = Gemma4TextConfig(hidden_activation=hidden_activation, enable_moe_block=True)
    return Gemma4Config(text_config=text.to_dict()) if multimodal else text


def _moe_runner_activation(hf_config, prefixes: tuple[str, ...]) -> list[str]:
    """The activation our MoE method runs for SGLang's runner config asking for erf "gelu" (the default of
    `FusedMoE(activation=...)`, which SGLang's Gemma 4 causal class leaves in place)."""
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig

    from nvfp4_ext.engines.sglang.config import Nvfp4ExtConfig
    from nvfp4_ext.engines.sglang.moe import Nvfp4ExtMoEMethod

    checkpoint = {"quant_method": "modelopt", "quant_algo": "NVFP4", "packed_modules_mapping": {}}
    if hf_config is not None:
        checkpoint["hf_config"] = hf_config
    config = Nvfp4ExtConfig.from_config(checkpoint)
    activations = []
    for prefix in prefixes:
        method = Nvfp4ExtMoEMethod(config, "nvfp4_w4a16", prefix)
        method.create_moe_runner(torch.nn.Module(), MoeRunnerConfig(activation="gelu", is_gated=True))
        activations.append(method.activation)
    return activations


@pytest.mark.parametrize("multimodal", [False, True], ids=["text-config", "multimodal-text-config"])
def test_gelu_request_runs_gelu_tanh_when_the_config_declares_it(plugins_loaded, caplog, multimodal) -> None:
    """Gemma 4 declares `hidden_activation: gelu_pytorch_tanh` (top level, or in `text_config` for the
    multimodal form): the experts run gelu_tanh, logged once per model, naming the first layer and why."""
    prefixes = ("model.layers.0.moe.experts", "model.layers.1.moe.experts")
    with caplog.at_level("WARNING", logger="nvfp4_ext"):
        activations = _moe_runner_activation(_gemma4_hf_config("gelu_pytorch_tanh", multimodal), prefixes)
    assert activations == ["gelu_tanh", "gelu_tanh"]
    logged = [r.getMessage() for r in caplog.records if "hidden_activation" in r.getMessage()]
    assert len(logged) == 1
    assert "layer model.layers.0.moe.experts" in logged[0] and "'gelu_pytorch_tanh'" in logged[0]


@pytest.mark.parametrize("declared", ["gelu", None], ids=["erf-gelu-config", "no-config"])
def test_erf_gelu_experts_are_still_refused(plugins_loaded, declared) -> None:
    """A model whose config declares erf GELU (or whose config SGLang did not pass) is refused: nvfp4_ext
    has no erf-GELU expert kernel and must not compute a different function."""
    hf_config = _gemma4_hf_config(declared, multimodal=False) if declared else None
    with pytest.raises(ConfigError) as info:
        _moe_runner_activation(hf_config, ("model.layers.0.moe.experts",))
    assert str(info.value) == (
        "layer model.layers.0.moe.experts: expert activation 'gelu' is not supported by nvfp4_ext "
        "(supported: gelu_tanh, silu)"
    )
