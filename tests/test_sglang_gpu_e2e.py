"""End to end on a GPU: `sglang.launch_server --quantization nvfp4_ext` serves a tiny NVFP4 DiffusionGemma
(one request per denoise policy, plus a rejected one; and, with `max_denoising_steps: 1` and a fixed `seed`,
the committed argmax canvas of one step from SGLang's seeded first canvas compared with transformers on the
dequantized weights) and a tiny NVFP4 Qwen3-MoE, whose greedy tokens must equal transformers' on the
dequantized checkpoint (teacher-forced, up to bf16 near ties; `gpu_reference.py`, checked on CPU by
tests/test_gpu_reference.py).

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
    dg_nvfp4 = quantize_tiny_checkpoint(dg, root / "dg_nvfp4")
    return {
        "diffusion_gemma": dg_nvfp4,
        "diffusion_gemma_dequantized": dequantize_checkpoint(dg_nvfp4, root / "dg_dequantized"),
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


def _serve_diffusion(checkpoints, root: Path, algorithm_config: dict, graph_mode: str) -> Iterator[str]:
    config = root / "dllm.yaml"
    config.write_text(json.dumps(algorithm_config))  # JSON is YAML
    yield from _serve(
        checkpoints["diffusion_gemma"],
        root / "server.log",
        "--dllm-algorithm",
        "Gemma4Renoise",
        "--dllm-algorithm-config",
        str(config),
        *GRAPH_MODES[graph_mode],
    )


@pytest.fixture(scope="module", params=list(GRAPH_MODES))
def diffusion_server(checkpoints, tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[str]:
    # SGLang's defaults, written out so the test documents the keys.
    defaults = {
        "max_denoising_steps": 16,
        "sampler_config": {"policy": "entropy_bound", "entropy_bound": 0.1},
    }
    yield from _serve_diffusion(checkpoints, tmp_path_factory.mktemp("dg_server"), defaults, request.param)


ONE_STEP_SEED, DG_VOCAB, DG_CANVAS = 1234, 4096, 16  # build_tiny_diffusion_gemma's vocab and canvas


@pytest.fixture(scope="module", params=list(GRAPH_MODES))
def one_step_diffusion_server(
    checkpoints, tmp_path_factory: pytest.TempPathFactory, request
) -> Iterator[str]:
    """One denoise step per canvas, first canvas from a fixed seed: the output is deterministic."""
    root = tmp_path_factory.mktemp("dg_one_step_server")
    one_step = {"max_denoising_steps": 1, "seed": ONE_STEP_SEED}
    yield from _serve_diffusion(checkpoints, root, one_step, request.param)


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
            "sampling_params": {
                "max_new_tokens": 16,
                "ignore_eos": True,
                "custom_params": custom_params or None,
            },
        },
    )
    assert status == 200, body
    ids = body["output_ids"]
    assert len(ids) == 16 and all(0 <= i < DG_VOCAB for i in ids), ids  # a full canvas, in the vocabulary


@pytest.mark.parametrize(
    "custom_params",
    [{}, {"diffusion_policy": "fixed_k", "diffusion_policy_k": 4}],
    ids=["entropy_bound", "fixed_k"],
)
def test_one_denoise_step_equals_transformers(
    one_step_diffusion_server: str, checkpoints, custom_params
) -> None:
    from gpu_reference import (
        assert_canvas_agrees,
        load_diffusion_reference,
        reference_canvas,
        sglang_initial_canvas,
    )

    prompts = [PROMPT_IDS, [2, 20, 21], [2, 5, 6, 7, 8, 9]]
    served = []
    for prompt in prompts:
        status, body = _post(
            f"{one_step_diffusion_server}/generate",
            {
                "input_ids": prompt,
                "sampling_params": {
                    "max_new_tokens": DG_CANVAS,
                    "ignore_eos": True,
                    "custom_params": custom_params or None,
                },
            },
        )
        assert status == 200, body
        served.append(body["output_ids"])
    # The engine draws the first canvas on its device from the configured seed; so does the reference.
    canvas = sglang_initial_canvas(ONE_STEP_SEED, DG_VOCAB, DG_CANVAS, "cuda")
    reference = load_diffusion_reference(checkpoints["diffusion_gemma_dequantized"])
    references = [reference_canvas(reference, prompt, canvas) for prompt in prompts]
    assert_canvas_agrees(served, references, [canvas] * len(prompts), DG_VOCAB)


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
    from gpu_reference import assert_served_greedy

    status, body = _post(
        f"{moe_server}/generate",
        {
            "input_ids": PROMPT_IDS,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True},
        },
    )
    assert status == 200, body
    assert_served_greedy(checkpoints["qwen3_moe_dequantized"], [PROMPT_IDS], [body["output_ids"]], 8)
