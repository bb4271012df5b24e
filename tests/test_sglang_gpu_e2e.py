"""End to end on a GPU: `sglang.launch_server --quantization nvfp4_ext` serves a tiny NVFP4 DiffusionGemma
(one request per denoise policy, plus a rejected one) and a tiny NVFP4 Qwen3-MoE, whose greedy tokens must
equal transformers' on the dequantized checkpoint (up to a near tie of the reference, `gpu_reference.py`).

Needs a CUDA GPU (sm80+) with SGLang installed with its GPU dependencies (`pip install nvfp4-ext[sglang]`).
Each server is a subprocess; it is stopped (SIGTERM, then SIGKILL) even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma, build_tiny_qwen3_moe

pytestmark = [pytest.mark.gpu, pytest.mark.sglang]

STARTUP_TIMEOUT_S = 900
PROMPT_IDS = [2, 10, 11, 12, 13]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    import requests

    response = requests.post(url, json=payload, timeout=300)
    try:
        body = response.json()
    except ValueError:
        body = {"text": response.text}
    return response.status_code, body


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_sglang_checkpoints import quantize_tiny_checkpoint

    root = tmp_path_factory.mktemp("sglang_e2e")
    dg = build_tiny_diffusion_gemma(root / "dg_bf16", dtype=torch.bfloat16)
    moe = build_tiny_qwen3_moe(root / "moe_bf16", dtype=torch.bfloat16)
    from nvfp4_ext.quantize import dequantize_checkpoint

    moe_nvfp4 = quantize_tiny_checkpoint(moe, root / "moe_nvfp4")
    return {
        "diffusion_gemma": quantize_tiny_checkpoint(dg, root / "dg_nvfp4"),
        "qwen3_moe": moe_nvfp4,
        "qwen3_moe_dequantized": dequantize_checkpoint(moe_nvfp4, root / "moe_dequantized"),
    }


def _serve(model: Path, log: Path, *extra: str) -> Iterator[str]:
    import requests

    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model),
        "--quantization",
        "nvfp4_ext",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--mem-fraction-static",
        "0.3",
        "--dtype",
        "bfloat16",
        *extra,
    ]
    env = dict(os.environ, SGLANG_PLUGINS="nvfp4_ext", HF_HUB_OFFLINE="1")
    with log.open("w") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# SGLang captures decode in CUDA graphs by default, which is what users run: every server test runs with
# graphs on, and once more eager (`--disable-cuda-graph`) as the extra case.
GRAPH_MODES = {"cuda-graphs": (), "eager": ("--disable-cuda-graph",)}


@pytest.fixture(scope="module", params=list(GRAPH_MODES))
def diffusion_server(checkpoints, tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[str]:
    root = tmp_path_factory.mktemp("dg_server")
    config = root / "dllm.yaml"
    # JSON is YAML: SGLang's defaults, written out so the test documents the keys.
    config.write_text(
        json.dumps(
            {"max_denoising_steps": 16, "sampler_config": {"policy": "entropy_bound", "entropy_bound": 0.1}}
        )
    )
    yield from _serve(
        checkpoints["diffusion_gemma"],
        root / "server.log",
        "--dllm-algorithm",
        "Gemma4Renoise",
        "--dllm-algorithm-config",
        str(config),
        *GRAPH_MODES[request.param],
    )


@pytest.fixture(scope="module", params=list(GRAPH_MODES))
def moe_server(checkpoints, tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[str]:
    log = tmp_path_factory.mktemp("moe_server") / "server.log"
    yield from _serve(checkpoints["qwen3_moe"], log, *GRAPH_MODES[request.param])


@pytest.mark.parametrize(
    "custom_params",
    [
        {},  # the server's policy: entropy_bound
        {"diffusion_policy": "confidence", "diffusion_policy_threshold": 0.5},
        {"diffusion_policy": "fixed_k", "diffusion_policy_k": 4},
    ],
    ids=["entropy_bound", "confidence", "fixed_k"],
)
def test_diffusion_gemma_generates_per_policy(diffusion_server: str, custom_params: dict) -> None:
    status, body = _post(
        f"{diffusion_server}/generate",
        {
            "input_ids": PROMPT_IDS,
            "sampling_params": {"max_new_tokens": 16, "custom_params": custom_params or None},
        },
    )
    assert status == 200, body
    ids = body["output_ids"]
    assert 0 < len(ids) <= 16
    assert all(0 <= i < 4096 for i in ids)


def test_diffusion_gemma_rejects_bad_policy(diffusion_server: str) -> None:
    status, body = _post(
        f"{diffusion_server}/generate",
        {
            "input_ids": PROMPT_IDS,
            "sampling_params": {
                "max_new_tokens": 8,
                "custom_params": {"diffusion_policy": "fixed_k", "diffusion_policy_k": 0},
            },
        },
    )
    assert status == 400
    assert "diffusion_policy_k" in json.dumps(body)


def test_nvfp4_moe_greedy_equals_transformers_on_dequantized_weights(moe_server: str, checkpoints) -> None:
    from gpu_reference import assert_greedy_matches, reference_greedy

    status, body = _post(
        f"{moe_server}/generate",
        {
            "input_ids": PROMPT_IDS,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True},
        },
    )
    assert status == 200, body
    assert len(body["output_ids"]) == 8
    reference = reference_greedy(checkpoints["qwen3_moe_dequantized"], [PROMPT_IDS], max_tokens=8)[0]
    assert_greedy_matches(body["output_ids"], reference)
