"""`nvfp4-ext inspect`: per-precision totals on the mixed checkpoint, the JSON contract, findings, --gpu."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    EXPERTS,
    build_mixed,
    mixed_tensors,
    nvfp4_config,
    nvfp4_tensors,
    write_checkpoint,
)

from nvfp4_ext.checkpoint.inspect import inspect_checkpoint
from nvfp4_ext.cli import main


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mixed(tmp_path_factory.mktemp("inspect") / "mixed", shards=2)


def _expected_totals() -> dict[str, dict[str, int]]:
    """Per-scheme params/bytes computed independently from the tensors the factory wrote."""
    tensors, _ = mixed_tensors()
    totals = {s: {"params": 0, "bytes": 0} for s in ("nvfp4", "fp8", "unquantized")}
    for name, t in tensors.items():
        if "experts" in name:
            scheme = "nvfp4"
        elif "self_attn" in name:
            scheme = "fp8"
        elif t.dim() >= 2:
            scheme = "unquantized"
        else:
            continue  # norms are not modules
        totals[scheme]["bytes"] += t.nbytes
        if scheme == "nvfp4" and t.dtype == torch.uint8:
            totals[scheme]["params"] += 2 * t.numel()  # two E2M1 codes per byte
        elif scheme != "nvfp4" and t.dim() >= 2:
            totals[scheme]["params"] += t.numel()
    return totals


def test_json_contract_and_per_precision_totals(mixed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mixed_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"modules", "summary"}
    for row in report["modules"]:
        assert set(row) >= {"name", "scheme", "shape", "params", "bytes", "bits_per_param", "findings"}
        assert isinstance(row["findings"], list) and row["params"] == math.prod(row["shape"])
    expected = _expected_totals()
    # 4 experts x (gate 32x64 + up 32x64 + down 64x32) in layer 0, fused [4,64,64] + [4,64,32] in layer 1
    assert expected["nvfp4"]["params"] == EXPERTS * 3 * 2048 + EXPERTS * (4096 + 2048)
    by_scheme = report["summary"]["by_scheme"]
    assert set(by_scheme) == {"nvfp4", "fp8", "unquantized"}
    for scheme, totals in expected.items():
        assert {k: by_scheme[scheme][k] for k in ("params", "bytes")} == totals, scheme
    params = sum(t["params"] for t in expected.values())
    nbytes = sum(t["bytes"] for t in expected.values())
    assert report["summary"]["bits_per_param"] == pytest.approx(8 * nbytes / params, abs=1e-4)
    # NVFP4 costs 4.5 bits (+ the per-tensor scales), FP8 8 bits, BF16 16 bits
    rows = {r["name"]: r for r in report["modules"]}
    assert 4.5 < rows["model.layers.1.mlp.experts.gate_up_proj"]["bits_per_param"] < 4.6
    assert rows["lm_head"]["bits_per_param"] == 16.0
    reasons = report["summary"]["unquantized_reasons"]
    assert reasons["excluded by pattern '*router*'"] == [
        "model.layers.0.mlp.router",
        "model.layers.1.mlp.router",
    ]
    assert reasons["named in the exclude list"] == ["lm_head"]
    assert reasons["embedding"] == ["model.embed_tokens"]


def test_text_table(mixed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mixed_dir), "--gpu", "9.0"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.experts.*.gate_proj (x4)  nvfp4" in out
    assert "excluded by pattern '*router*': model.layers.0.mlp.router, model.layers.1.mlp.router" in out
    assert "unquantized (BF16) layers and why:" in out
    total_line = next(line for line in out.splitlines() if line.strip().startswith("total"))
    report = inspect_checkpoint(str(mixed_dir), scan=False)
    assert total_line.split()[-1] == f"{report['summary']['bits_per_param']:.2f}"
    assert "backends on sm_90" in out and "fp8_linear: scaled_mm" in out and "nvfp4_moe: triton" in out


def test_gpu_flag(mixed_dir: Path) -> None:
    report = inspect_checkpoint(str(mixed_dir), scan=False, gpu="8.0")
    backends = report["summary"]["backends"]
    assert (backends["device"], backends["by_layer_kind"]) == (
        "sm_80",
        {"fp8_linear": "triton", "nvfp4_moe": "triton"},
    )
    assert set(backends["all_layer_kinds"]) == {
        "nvfp4_linear", "nvfp4_w4a16_linear", "nvfp4_moe", "nvfp4_w4a16_moe", "fp8_linear"
    }  # fmt: skip
    assert inspect_checkpoint(str(mixed_dir), scan=False, gpu="cpu")["summary"]["backends"][
        "by_layer_kind"
    ] == {
        "fp8_linear": "torch",
        "nvfp4_moe": "torch",
    }


def test_bad_gpu_flag_is_one_error_line(mixed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mixed_dir), "--gpu", "hopper"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: --gpu: expected a CUDA capability MAJOR.MINOR such as 9.0 (or cpu), got 'hopper'"
    ]


def test_findings(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0.self_attn"
    q = torch.randn(32, 64, generator=g)
    q[:, :16] = 0.0  # 32 rows x 1 block of zeros
    tensors = {
        **nvfp4_tensors(f"{p}.q_proj", q),
        **nvfp4_tensors(f"{p}.k_proj", torch.randn(16, 64, generator=g) * 3.1),
        **nvfp4_tensors(f"{p}.v_proj", torch.randn(16, 64, generator=g)),
        "lm_head.weight": torch.randn(8, 64, generator=g).bfloat16(),
    }
    tensors["lm_head.weight"][0, 0] = float("nan")
    tensors["lm_head.weight"][1, 1] = float("inf")
    report = inspect_checkpoint(str(write_checkpoint(tmp_path / "c", tensors, nvfp4_config())))
    rows = {r["name"]: r for r in report["modules"]}
    ratio = max(rows[f"{p}.{s}"]["global_scale"][0] for s in ("q_proj", "k_proj", "v_proj")) / min(
        rows[f"{p}.{s}"]["global_scale"][0] for s in ("q_proj", "k_proj", "v_proj")
    )
    assert ratio > 2
    assert rows[f"{p}.k_proj"]["findings"] == [f"shard global scales of qkv_proj differ by {ratio:.1f}x"]
    assert rows[f"{p}.q_proj"]["findings"] == [
        f"shard global scales of qkv_proj differ by {ratio:.1f}x",
        "32 all-zero blocks",
    ]
    assert rows["lm_head"]["findings"] == ["NaN (1 values)", "inf (1 values)"]
    assert inspect_checkpoint(str(tmp_path / "c"), scan=False)["modules"][0]["findings"] == []
