"""The README main job: `nvfp4-ext demo` builds, quantizes, serves through vLLM, chats, stops the server."""

from __future__ import annotations

import re
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from nvfp4_ext import demo
from nvfp4_ext.cli import main

pytestmark = pytest.mark.vllm


def test_demo_serves_a_chat_completion_and_reports_backends(tmp_path, capsys):
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = main(["demo", "--model", "qwen3-dense", "--workdir", str(tmp_path), "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    answer = next(line for line in out.splitlines() if "answer:" in line)
    assert len(answer.split("answer:")[1].strip(" '\"").split()) == 4
    assert "nvfp4_ext backends that ran: nvfp4_w4a16_linear -> torch" in out
    assert "server stopped (exit code 0)" in out
    assert (tmp_path / "qwen3-dense-nvfp4-w4a16" / "config.json").is_file()
    leftover = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not leftover, f"demo left processes running: {leftover}"


def test_demo_refuses_a_busy_port_before_building_anything(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["demo", "--port", str(port), "--workdir", str(tmp_path / "w")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"error: --port {port}: 127.0.0.1:{port} is not free")
    assert len(captured.err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("said", "server", "timeout", "expected"),
    [
        ("no such model", "raise SystemExit(3)", "60", "exited with code 3 before"),
        ("loading", "import time; time.sleep(60)", "2", "did not answer /health within 2 s"),
    ],
    ids=["server-exits", "server-times-out"],
)
def test_demo_failure_says_why_and_keeps_the_log(
    said, server, timeout, expected, monkeypatch, tmp_path, capsys
):
    # the server process is replaced by a stand-in that fails: what is under test is the demo's report
    script = f"print({said!r}, flush=True); {server}"
    monkeypatch.setattr(demo, "server_command", lambda *a: [sys.executable, "-c", script])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo's temporary workdir goes here
    code = main(["demo", "--model", "qwen3-dense", "--timeout", timeout])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expected in err, err
    log = Path(re.search(r"its log is kept at (\S+);", err)[1])
    assert log.is_file() and log.parent.parent == tmp_path
    assert said in log.read_text()
