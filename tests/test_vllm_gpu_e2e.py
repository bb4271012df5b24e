"""GPU end to end: vLLM (CUDA build) serves the tiny NVFP4 Gemma 4 MoE and Qwen3-MoE with `--quantization
nvfp4_ext`, bf16 and CUDA graphs on (no enforce_eager), and its greedy tokens equal transformers' float32
greedy tokens on the dequantized checkpoint (up to a near tie of the reference, `gpu_reference.py`).

Run: `pytest -m gpu tests/test_vllm_gpu_e2e.py` (also part `serve-vllm` of `nvfp4-ext gpu-check`).
"""

from __future__ import annotations

import gc

import pytest
import torch
from gpu_reference import assert_greedy_matches, reference_greedy
from test_vllm_helpers import PROMPTS, engine_env, make_llm, tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]

MAX_TOKENS = 12


@pytest.mark.parametrize("model", ["gemma4-moe", "qwen3-moe"])
def test_cuda_graph_greedy_equals_transformers_on_dequantized_weights(model, tmp_path):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    checkpoint = tiny_checkpoint(tmp_path, model, "modelopt")
    prompt_ids = [AutoTokenizer.from_pretrained(checkpoint)(p).input_ids for p in PROMPTS]
    with engine_env():
        llm = make_llm(checkpoint, dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.3)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
            served = [list(o.outputs[0].token_ids) for o in outputs]
        finally:
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    reference = reference_greedy(tiny_checkpoint(tmp_path, model, "dequantized"), prompt_ids, MAX_TOKENS)
    for tokens, ref in zip(served, reference, strict=True):
        assert_greedy_matches(tokens, ref)
