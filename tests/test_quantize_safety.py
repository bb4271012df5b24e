"""Quantizer refusals, interruption and write failures, K%16 handling, and activation calibration."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_ext.cli import main
from nvfp4_ext.errors import CheckpointError, ConfigError, Nvfp4ExtError
from nvfp4_ext.quantize import io as quantize_io
from nvfp4_ext.quantize import quantize_checkpoint
from nvfp4_ext.tiny_models import build_tiny_qwen3_dense, build_tiny_qwen3_moe


def _synthetic(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["Synthetic"], "model_type": "synthetic"}))
    save_file(tensors, str(root / "model.safetensors"))
    return root


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def small(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 64, generator=g) for i in range(6)}
    tensors["model.norm.weight"] = torch.ones(64)
    return _synthetic(tmp_path / "src", tensors)


def test_nvfp4_without_calibration_points_to_w4a16(small, tmp_path):
    with pytest.raises(ConfigError, match="--recipe w4a16"):
        quantize_checkpoint(small, tmp_path / "out", recipe="nvfp4")
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_in_one_line(small, tmp_path, capsys):
    assert main(["quantize", str(small), str(tmp_path / "out"), "--recipe", "nvfp4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--calib" in err and "Traceback" not in err


def test_refuses_existing_destination_unless_forced(small, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists.*--force"):
        quantize_checkpoint(small, dst, recipe="w4a16", progress=False)
    assert (dst / "keep.txt").exists()
    quantize_checkpoint(small, dst, recipe="w4a16", progress=False, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "hf_quant_config.json").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_refuses_a_file_as_destination_even_with_force(small, tmp_path, capsys, force):
    target = tmp_path / "out.safetensors"
    target.write_text("not a directory")
    assert main(["quantize", str(small), str(target), *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output {target} exists and is not a directory")
    assert len(err.splitlines()) == 1
    assert target.read_text() == "not a directory" and _leftovers(tmp_path) == []


def test_rejects_already_quantized_input(small, tmp_path):
    first = quantize_checkpoint(small, tmp_path / "q", recipe="w4a16", progress=False)
    with pytest.raises(CheckpointError, match="already quantized.*modelopt.*W4A16_NVFP4"):
        quantize_checkpoint(first, tmp_path / "qq", recipe="w4a16", progress=False)
    (first / "config.json").write_text(json.dumps({"architectures": ["Synthetic"]}))
    (first / "hf_quant_config.json").unlink()
    with pytest.raises(CheckpointError, match="already quantized.*U8"):
        quantize_checkpoint(first, tmp_path / "qq", recipe="w4a16", progress=False)


def test_nothing_to_quantize_is_an_error(small, tmp_path):
    with pytest.raises(ConfigError, match="nothing to quantize"):
        quantize_checkpoint(small, tmp_path / "out", recipe="w4a16", exclude=("*",), progress=False)


def test_k_not_multiple_of_16_stays_in_source_precision(tmp_path, caplog):
    g = torch.Generator().manual_seed(1)
    src = _synthetic(
        tmp_path / "src",
        {
            "model.layers.0.mlp.down_proj.weight": torch.randn(32, 40, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(40, 32, generator=g),
        },
    )
    out = quantize_checkpoint(src, tmp_path / "out", recipe="w4a16", progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in config["ignore"]
    assert "model.layers.0.mlp.up_proj" not in config["ignore"]
    assert "K=40 is not a multiple of 16" in caplog.text
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.uint8


def test_failed_write_leaves_nothing(small, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = quantize_io.ShardWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        original(self, name, tensor)

    monkeypatch.setattr(quantize_io.ShardWriter, "write", failing)
    with pytest.raises(Nvfp4ExtError, match="No space left"):
        quantize_checkpoint(small, tmp_path / "out", recipe="w4a16", progress=False)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


_SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    import nvfp4_ext.quantize.quantizer as quantizer
    original = quantizer._process
    def slow(*args, **kwargs):
        print("tensor", flush=True)
        time.sleep(0.2)
        return original(*args, **kwargs)
    quantizer._process = slow
    from nvfp4_ext.cli import main
    sys.exit(main(["quantize", sys.argv[1], sys.argv[2], "--recipe", "w4a16", "--no-progress"]))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing(small, tmp_path, sig):
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, str(small), str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for _ in range(3):  # wait until tensors are being written
            assert proc.stdout.readline().strip() == "tensor"
        assert _leftovers(tmp_path), "the run should be writing into a temporary directory"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "error: interrupted" in err
    assert not dst.exists()
    assert _leftovers(tmp_path) == []


def _calib_text(path: Path, words: int, vocab: int = 500) -> Path:
    rng = random.Random(3)
    path.write_text(" ".join(f"w{rng.randrange(4, vocab)}" for _ in range(words)))
    return path


def test_calibrated_input_scale_is_activation_amax(tmp_path):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    src = build_tiny_qwen3_dense(tmp_path / "dense", dtype=torch.float32)
    text = _calib_text(tmp_path / "calib.txt", 120)  # one forward chunk
    out = quantize_checkpoint(src, tmp_path / "out", recipe="nvfp4", calib=text, progress=False)
    # Independent measurement: q_proj's input is input_layernorm's output.
    model = Qwen3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(src)(text.read_text(), add_special_tokens=False)["input_ids"]
    seen = {}

    def record(module, args, output):
        seen["amax"] = float(output.abs().amax())

    model.model.layers[1].input_layernorm.register_forward_hook(record)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        stored = float(f.get_tensor("model.layers.1.self_attn.q_proj.input_scale"))
    assert stored == pytest.approx(seen["amax"] / 2688, rel=1e-6)


def test_calibration_records_per_expert_amax(tmp_path):
    src = build_tiny_qwen3_moe(tmp_path / "moe", dtype=torch.float32)
    text = _calib_text(tmp_path / "calib.txt", 200)
    out = quantize_checkpoint(src, tmp_path / "out", recipe="nvfp4", calib=text, progress=False)
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        gate = [
            float(f.get_tensor(f"model.layers.0.mlp.experts.{e}.gate_proj.input_scale")) for e in range(8)
        ]
        up = [float(f.get_tensor(f"model.layers.0.mlp.experts.{e}.up_proj.input_scale")) for e in range(8)]
        down = [
            float(f.get_tensor(f"model.layers.0.mlp.experts.{e}.down_proj.input_scale")) for e in range(8)
        ]
        attn = float(f.get_tensor("model.layers.0.self_attn.q_proj.input_scale"))
    assert gate == up
    assert all(s > 0 for s in gate + down)
    assert len(set(gate)) > 1 and len(set(down)) > 1  # routed tokens differ per expert
    assert max(gate) == pytest.approx(attn, rel=0.5)  # same normalized residual stream scale


def test_corrupt_input_gets_a_named_error(small, tmp_path):
    shard = small / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # truncate the last tensor's bytes
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        quantize_checkpoint(small, tmp_path / "out", recipe="w4a16", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        quantize_checkpoint(small, tmp_path / "out", recipe="w4a16", progress=False)


def test_nan_weight_gets_a_named_error(tmp_path):
    weight = torch.randn(32, 64)
    weight[3, 5] = float("nan")
    src = _synthetic(tmp_path / "src", {"model.layers.0.mlp.up_proj.weight": weight})
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight.*NaN or Inf"):
        quantize_checkpoint(src, tmp_path / "out", recipe="w4a16", progress=False)
    assert _leftovers(tmp_path) == []


def test_cli_quantizes_with_excludes_and_mse(small, tmp_path, capsys):
    dst = tmp_path / "out"
    argv = [
        "quantize",
        str(small),
        str(dst),
        "--recipe",
        "w4a16",
        "--scales",
        "mse",
        "--exclude",
        "*.layers.0.*",
    ]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "5 quantized tensors" in out and "mse scales: squared error" in out and "lower than rtn" in out
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == "W4A16_NVFP4"
    assert (
        "model.layers.0.mlp.up_proj" in config["ignore"]
        and "model.layers.1.mlp.up_proj" not in config["ignore"]
    )
