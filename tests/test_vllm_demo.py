"""The README main job: `nvfp4-ext demo` builds, quantizes, serves through vLLM, chats, stops the server."""

from __future__ import annotations

import pytest

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
