"""`nvfp4-ext demo`: the README's main job, end to end on any machine with vLLM (CPU build included).

Builds a tiny random model locally, quantizes it to NVFP4 with `nvfp4_ext.quantize`, starts vLLM's OpenAI
server with `--quantization nvfp4_ext` on 127.0.0.1, sends one chat completion, prints the answer and which
nvfp4_ext backends ran (read from the server log), then stops the server. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from nvfp4_ext.errors import ConfigError, Nvfp4ExtError

__all__ = ["add_arguments", "check_port", "run", "server_command", "start_failure", "wait_ready"]

MODELS = ("gemma4-moe", "qwen3-moe", "qwen3-dense")
_BACKEND_LINE = re.compile(r"nvfp4_ext: (\S+) layers run on the (\S+) backend")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="gemma4-moe", help="tiny model family to build")
    parser.add_argument(
        "--recipe",
        choices=("w4a16", "nvfp4"),
        default="w4a16",
        help="w4a16 (weight-only) or nvfp4 (W4A4, calibrated on a shipped text)",
    )
    parser.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1 (default: a free one)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the models and the server log here (default: a temporary directory, removed after a "
        "successful run and kept after a failure)",
    )
    parser.add_argument("--prompt", default="w5 w17 w99 w3", help="chat message to send")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """Fail before building anything when 127.0.0.1:`port` is taken (vLLM would print a long traceback).

    Raises:
        ConfigError: naming --port.
    """
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: 127.0.0.1:{port} is not free ({exc.strerror})") from None


def _step(n: int, text: str) -> None:
    print(f"[{n}/5] {text}", flush=True)


def _server_env(on_cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if on_cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default memory check fails on small machines
    return env


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 240.0) -> bool:
    """Poll the server's /health until 200; False if the process exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def _chat(port: int, model: str, prompt: str, max_tokens: int) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        raise Nvfp4ExtError(
            f"chat completion failed: HTTP {exc.code}: {exc.read().decode(errors='replace')}"
        ) from None


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_failure(proc: subprocess.Popen, log_path: Path, timeout: float) -> str:
    """Why a server that never answered /health failed: it exited (with which code) or timed out."""
    code = proc.poll()
    if code is not None:
        what = f"the vLLM server exited with code {code} before it was ready"
    else:
        what = f"the vLLM server did not answer /health within {timeout:.0f} s (--timeout)"
    return f"{what}; its log is kept at {log_path}; last lines:\n{_tail(log_path)}"


def server_command(model_dir: Path, port: int, on_cpu: bool) -> list[str]:
    """vLLM's OpenAI server on 127.0.0.1 serving `model_dir` with our quantization method."""
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--quantization",
        "nvfp4_ext",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32" if on_cpu else "bfloat16",
        "--max-model-len",
        "256",
    ]
    if on_cpu:
        command.append("--enforce-eager")
    return command


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "vLLM is not installed: run scripts/install.sh (CPU) or `pip install nvfp4-ext[vllm]` (GPU)"
        )
    import torch
    from transformers.utils import logging as hf_logging

    from nvfp4_ext.quantize import quantize_checkpoint
    from nvfp4_ext.tiny_models import TINY_BUILDERS

    hf_logging.disable_progress_bar()  # "Writing model shards" bars of a 1-shard tiny model are noise

    if args.port:
        check_port(args.port)
    on_cpu = not torch.cuda.is_available()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nvfp4_ext_demo_"))
    workdir.mkdir(parents=True, exist_ok=True)
    succeeded = False
    try:
        source, quantized = workdir / f"{args.model}-bf16", workdir / f"{args.model}-nvfp4-{args.recipe}"
        _step(1, f"building a tiny random {args.model} model in {source}")
        if not (source / "config.json").is_file():
            TINY_BUILDERS[args.model](source)
        _step(2, f"quantizing it to NVFP4 ({args.recipe}) -> {quantized}")
        if not (quantized / "config.json").is_file():
            calib = Path(__file__).parent / "data" / "eval_text.txt" if args.recipe == "nvfp4" else None
            quantize_checkpoint(
                source, quantized, recipe=args.recipe, calib=calib, force=True, progress=False
            )
        port = args.port or _free_port()
        command = server_command(quantized, port, on_cpu)
        log_path = workdir / "server.log"
        _step(3, f"starting vLLM: {' '.join(command)}  (log: {log_path})")
        with log_path.open("w") as log:
            proc = subprocess.Popen(command, env=_server_env(on_cpu), stdout=log, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            if not wait_ready(proc, port, args.timeout):
                raise Nvfp4ExtError(start_failure(proc, log_path, args.timeout))
            print(f"      ready in {time.monotonic() - started:.0f} s", flush=True)
            _step(4, f"chat completion for {args.prompt!r}")
            answer = _chat(port, str(quantized), args.prompt, args.max_tokens)
            print(f"      answer: {answer.strip()!r}", flush=True)
            backends = dict(_BACKEND_LINE.findall(log_path.read_text(errors="replace")))
            _step(
                5,
                "nvfp4_ext backends that ran: "
                + (
                    ", ".join(f"{kind} -> {backend}" for kind, backend in sorted(backends.items()))
                    or "none logged"
                ),
            )
        finally:
            code = _stop(proc)
        print(f"      server stopped (exit code {code})", flush=True)
        if not backends:
            raise Nvfp4ExtError(f"the server ran but logged no nvfp4_ext layer (log kept at {log_path})")
        succeeded = True
        return 0
    finally:
        # a temporary workdir goes only after success: on failure the message points into it
        if args.workdir is None and succeeded:
            shutil.rmtree(workdir, ignore_errors=True)
