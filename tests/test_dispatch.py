"""Backend dispatch per layer kind and device: FlashInfer on sm>=100 (W4A4), Triton on other CUDA, torch on
CPU."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from nvfp4_ext import dispatch
from nvfp4_ext.dispatch import LAYER_KINDS, describe_backends, flashinfer_available, select_backend
from nvfp4_ext.engines import common


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("NVFP4_EXT_BACKEND", raising=False)


@pytest.mark.parametrize("capability", [(9, 0), (8, 9), (8, 0)], ids=["sm90", "sm89", "sm80"])
@pytest.mark.parametrize("kind", ["nvfp4_linear", "nvfp4_w4a16_linear", "nvfp4_moe", "nvfp4_w4a16_moe"])
def test_pre_blackwell_cuda_runs_triton(kind, capability):
    assert select_backend(kind, capability, has_flashinfer=True) == "triton"
    assert select_backend(kind, capability, has_flashinfer=False) == "triton"


@pytest.mark.parametrize("kind", ["nvfp4_linear", "nvfp4_moe"])
def test_blackwell_w4a4_runs_flashinfer_when_importable(kind, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        dispatch.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flashinfer" else real_find_spec(name, *a),
    )
    assert flashinfer_available()
    assert select_backend(kind, (10, 0)) == "flashinfer"
    assert select_backend(kind, (12, 0)) == "flashinfer"


@pytest.mark.parametrize("kind", ["nvfp4_linear", "nvfp4_moe"])
def test_blackwell_without_flashinfer_runs_triton(kind, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        dispatch.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "flashinfer" else real_find_spec(name, *a),
    )
    assert not flashinfer_available()
    assert select_backend(kind, (10, 0)) == "triton"


@pytest.mark.parametrize("kind", ["nvfp4_w4a16_linear", "nvfp4_w4a16_moe"])
def test_blackwell_weight_only_layers_run_triton(kind):
    # FP4 tensor cores need FP4 activations: W4A16 layers stay on our weight-only kernels.
    assert select_backend(kind, (10, 0), has_flashinfer=True) == "triton"


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_cpu_runs_torch(kind):
    assert select_backend(kind, None, has_flashinfer=True) == "torch"


def test_fp8_uses_scaled_mm_only_with_fp8_tensor_cores():
    assert select_backend("fp8_linear", (8, 9)) == "scaled_mm"
    assert select_backend("fp8_linear", (9, 0)) == "scaled_mm"
    assert select_backend("fp8_linear", (8, 0)) == "triton"


def test_forced_backend_and_its_errors(monkeypatch):
    monkeypatch.setenv("NVFP4_EXT_BACKEND", "torch")
    assert select_backend("nvfp4_moe", (10, 0), has_flashinfer=True) == "torch"
    monkeypatch.setenv("NVFP4_EXT_BACKEND", "triton")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        select_backend("nvfp4_moe", None)
    monkeypatch.setenv("NVFP4_EXT_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="NVFP4_EXT_BACKEND='cutlass'"):
        select_backend("nvfp4_moe", (9, 0))


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown layer kind 'nvfp4_conv'"):
        select_backend("nvfp4_conv", (9, 0))  # type: ignore[arg-type]


def test_describe_backends_covers_every_kind():
    table = describe_backends((10, 0), has_flashinfer=True)
    assert set(table) == set(LAYER_KINDS)
    assert table["nvfp4_linear"] == "flashinfer" and table["nvfp4_w4a16_moe"] == "triton"


def test_engine_layers_log_their_backend_once(monkeypatch, caplog):
    monkeypatch.setattr(common, "BACKENDS_USED", {})
    # register() may have routed our logger to vLLM's handlers in this process; capture it here instead.
    monkeypatch.setattr(logging.getLogger("nvfp4_ext"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("nvfp4_ext"), "handlers", [])
    with caplog.at_level(logging.INFO, logger="nvfp4_ext"):
        for _ in range(3):
            assert common.backend_for("nvfp4_w4a16_moe", torch.device("cpu")) == "torch"
    lines = [r.getMessage() for r in caplog.records if "nvfp4_w4a16_moe" in r.getMessage()]
    assert lines == ["nvfp4_ext: nvfp4_w4a16_moe layers run on the torch backend"]
    assert common.BACKENDS_USED == {"nvfp4_w4a16_moe": "torch"}


def test_unimplemented_backend_falls_back_to_triton_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(common, "BACKENDS_USED", {})
    monkeypatch.setattr(logging.getLogger("nvfp4_ext"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("nvfp4_ext"), "handlers", [])
    monkeypatch.setattr(common, "select_backend", lambda kind, capability: "flashinfer")
    with caplog.at_level(logging.INFO, logger="nvfp4_ext"):
        chosen = common.backend_for("nvfp4_moe", torch.device("cpu"), implemented=("torch", "triton"))
    assert chosen == "triton" and common.BACKENDS_USED == {"nvfp4_moe": "triton"}
    assert "nvfp4_moe has no flashinfer path here" in caplog.text
