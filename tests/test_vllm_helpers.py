"""Shared helpers of the vLLM tests: tiny NVFP4 checkpoints (via `nvfp4_ext.quantize`), greedy references.

Holds no tests itself. Engine tests run vLLM in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), float32, eager.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from nvfp4_ext.demo import wait_ready  # noqa: F401  (shared with the tests that start servers)

PROMPT_SHORT = "w5 w17 w99 w3 w250"
# 24 words + BOS: longer than the tiny models' sliding window (16).
PROMPT_LONG = " ".join(f"w{(i * 37) % 500 + 4}" for i in range(24))
PROMPTS = [PROMPT_SHORT, PROMPT_LONG]
MAX_TOKENS = 12

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@contextlib.contextmanager
def engine_env():
    """ENGINE_ENV set for the duration (restored after, so no other test inherits it)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENGINE_ENV.items():
            patch.setenv(key, os.environ.get(key, value))
        yield


def tiny_checkpoint(root: Path, model: str, form: str = "modelopt") -> Path:
    """A tiny model in one form, built on first use under `root` (a session temp dir) and reused after.

    Args:
        model: a key of `nvfp4_ext.tiny_models.TINY_BUILDERS` ("gemma4-moe", "qwen3-moe", "qwen3-dense").
        form: "source" (bf16), "modelopt" / "compressed-tensors" (NVFP4 W4A16 from the project quantizer, same
            codes and block scales), "w4a4" (ModelOpt NVFP4 with calibrated input scales), "mixed"
            (MIXED_PRECISION: NVFP4 experts, block-FP8 attention), or "dequantized" / "dequantized-w4a4" /
            "dequantized-mixed" (float32 HF checkpoints of those weights).
    """
    from nvfp4_ext.quantize import dequantize_checkpoint, quantize_checkpoint
    from nvfp4_ext.tiny_models import TINY_BUILDERS

    out = root / model / form
    if out.is_dir():
        return out
    if form == "source":
        TINY_BUILDERS[model](out)
    elif form in ("modelopt", "compressed-tensors"):
        quantize_checkpoint(
            tiny_checkpoint(root, model, "source"), out, recipe="w4a16", output_format=form, progress=False
        )
    elif form == "w4a4":
        calib = Path(__file__).parents[1] / "nvfp4_ext" / "data" / "eval_text.txt"
        quantize_checkpoint(
            tiny_checkpoint(root, model, "source"), out, recipe="nvfp4", calib=calib, progress=False
        )
    elif form == "mixed":
        quantize_checkpoint(tiny_checkpoint(root, model, "source"), out, recipe="mixed", progress=False)
    elif form == "dequantized-mixed":
        dequantize_checkpoint(tiny_checkpoint(root, model, "mixed"), out)
    elif form == "dequantized":
        dequantize_checkpoint(tiny_checkpoint(root, model, "modelopt"), out)
    elif form == "dequantized-w4a4":
        dequantize_checkpoint(tiny_checkpoint(root, model, "w4a4"), out)
    else:
        raise ValueError(f"unknown checkpoint form {form!r}")
    return out


def hf_greedy(model_dir: Path, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """transformers float32 greedy continuation token ids (prompt excluded; EOS does not stop it, like
    vLLM's ignore_eos)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(max_tokens):
                next_id = int(model(ids).logits[0, -1].argmax())
                generated.append(next_id)
                ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
        outs.append(generated)
    return outs


def vllm_greedy(llm, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def make_llm(model_dir: Path, **kwargs):
    """An in-process `vllm.LLM` with quantization="nvfp4_ext" (call inside `engine_env()`)."""
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        quantization="nvfp4_ext",
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
    )
    args.update(kwargs)
    return LLM(**args)


# --------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "8",
        *extra,
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


def post_json(port: int, path: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode
