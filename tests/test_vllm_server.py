"""Acceptance: vLLM's OpenAI server with `--quantization nvfp4_ext` on CPU: /v1/completions and
/v1/chat/completions answer 200, 8 concurrent clients x 5 requests see zero errors, SIGTERM stops it cleanly
(no leftover processes); a malformed NVFP4 checkpoint stops the server at startup with our error message,
before any engine process starts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_vllm_helpers import (
    free_port,
    post_json,
    server_command,
    server_env,
    stop,
    tiny_checkpoint,
    wait_ready,
)

pytestmark = pytest.mark.vllm
psutil = pytest.importorskip("psutil")  # installed with vLLM


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm_server_ckpts")


@pytest.fixture(scope="module")
def server(ckpt_root, tmp_path_factory):
    model_dir = tiny_checkpoint(ckpt_root, "qwen3-moe", "modelopt")
    port = free_port()
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            server_command(model_dir, port, "--quantization", "nvfp4_ext"),
            env=server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = wait_ready(proc, port)
        assert ready, f"server did not become ready:\n{log_path.read_text()[-4000:]}"
        yield {"proc": proc, "port": port, "model": str(model_dir), "log": log_path}
    finally:
        children = _children(proc)
        stop(proc)
        for child in children:
            if child.is_running():
                child.kill()


def _children(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _completion(server, i: int) -> int:
    status, _ = post_json(
        server["port"],
        "/v1/completions",
        {"model": server["model"], "prompt": f"w{i + 4} w{i + 9} w7", "max_tokens": 8, "temperature": 0},
    )
    return status


def test_completions_and_chat_answer_200(server):
    status, body = post_json(
        server["port"],
        "/v1/completions",
        {"model": server["model"], "prompt": "w5 w17 w99", "max_tokens": 6, "temperature": 0},
    )
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["text"].strip()
    status, body = post_json(
        server["port"],
        "/v1/chat/completions",
        {
            "model": server["model"],
            "messages": [{"role": "user", "content": "w5 w17"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip()


def test_eight_concurrent_clients_five_requests_each_no_errors(server):
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda i: _completion(server, i), range(8 * 5)))
    assert statuses == [200] * 40


def test_streaming_benchmark_clients_get_every_token(server):
    spec = importlib.util.spec_from_file_location(
        "serve_streams", Path(__file__).parents[1] / "benchmarks" / "serve_streams.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules["serve_streams"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    results, wall = bench.run_clients(
        f"http://127.0.0.1:{server['port']}",
        server["model"],
        clients=8,
        requests=2,
        prompt="w5 w17",
        max_tokens=8,
        chat=True,
        timeout=120,
    )
    summary = bench.summarize(results, 8, wall)
    assert summary.errors == 0, summary.error_samples
    assert summary.requests == 16 and all(r.completion_tokens == 8 for r in results)
    assert all(0 < r.ttft_s <= r.latency_s for r in results)
    assert summary.generation_tokens_per_s == pytest.approx(16 * 8 / wall)


def test_log_names_the_backends_that_ran(server):
    log = server["log"].read_text()
    assert "nvfp4_ext: nvfp4_w4a16_linear layers run on the torch backend" in log
    assert "nvfp4_ext: nvfp4_w4a16_moe layers run on the torch backend" in log


def test_sigterm_stops_the_server_cleanly(server):
    children = _children(server["proc"])
    assert children, "expected the engine-core process under the API server"
    assert stop(server["proc"], timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"processes left running after SIGTERM: {[p.pid for p in alive]}"


def test_malformed_checkpoint_fails_at_startup_with_our_message(ckpt_root, tmp_path):
    good = tiny_checkpoint(ckpt_root, "qwen3-moe", "modelopt")
    bad = tmp_path / "malformed"
    bad.mkdir()
    missing = "model.layers.1.self_attn.o_proj.weight_scale"
    for item in good.iterdir():
        if item.suffix == ".safetensors":
            tensors = load_file(str(item))
            tensors.pop(missing, None)
            save_file(tensors, str(bad / item.name), metadata={"format": "pt"})
        else:
            (bad / item.name).write_bytes(item.read_bytes())
    port = free_port()
    proc = subprocess.run(
        server_command(bad, port, "--quantization", "nvfp4_ext"),
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"tensor {missing}: missing" in output, output[-3000:]
    # Caught in the API server process: no engine core or worker was started.
    assert "EngineCore" not in output and "Worker" not in output, output[-3000:]
