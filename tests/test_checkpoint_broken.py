"""A corpus of deliberately broken tiny checkpoints: each yields its own CheckpointError message naming the
file and tensor, and `nvfp4-ext inspect` exits 2 with one `error:` line (no traceback, no partial output)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    dense_nvfp4_tensors,
    fp8_tensors,
    nvfp4_config,
    nvfp4_tensors,
    write_checkpoint,
)

from nvfp4_ext.checkpoint.validate import validate_checkpoint
from nvfp4_ext.cli import main
from nvfp4_ext.errors import CheckpointError

UP = "model.layers.0.mlp.up_proj"
ATTN = "model.layers.0.self_attn"


@dataclass
class Broken:
    """tensors/config edits before writing, file edits after; the expected message and tensor."""

    id: str
    message: str  # regex matched against str(error)
    tensor: str | None = None
    file: str | None = None  # expected basename of error.file
    tensors: Callable[[dict], None] = lambda t: None
    config: Callable[[dict], dict | None] = lambda c: c
    files: Callable[[Path], None] = lambda d: None
    shards: int = 1


def _drop(*names: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        for n in names:
            del t[n]

    return edit


def _set(name: str, value: torch.Tensor) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[name] = value

    return edit


def _scale_byte(value: int) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        raw = t[f"{UP}.weight_scale"].view(torch.uint8).clone()
        raw[3, 1] = value
        t[f"{UP}.weight_scale"] = raw.view(torch.float8_e4m3fn)

    return edit


def _k24(t: dict) -> None:
    t.update(nvfp4_tensors(UP, torch.randn(32, 32)))
    t[f"{UP}.weight"] = t[f"{UP}.weight"][:, :12].contiguous()  # K = 24
    t[f"{UP}.weight_scale"] = t[f"{UP}.weight_scale"][:, :1].contiguous()


def _mixed_qkv(t: dict) -> None:
    del t[f"{ATTN}.k_proj.weight_scale_2"]
    t.update(fp8_tensors(f"{ATTN}.k_proj", torch.randn(16, 64)))


def _mixed_config(c: dict) -> dict:
    layers = {f"{ATTN}.{p}": {"quant_algo": "NVFP4"} for p in ("q_proj", "v_proj", "o_proj")}
    layers[f"{ATTN}.k_proj"] = {"quant_algo": "FP8"}
    layers.update(
        {f"model.layers.0.mlp.{p}": {"quant_algo": "NVFP4"} for p in ("gate_proj", "up_proj", "down_proj")}
    )
    return {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "exclude_modules": ["lm_head"],
            "quantized_layers": layers}  # fmt: skip


def _truncate(nbytes: int) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        path = d / "model.safetensors"
        path.write_bytes(path.read_bytes()[:nbytes])  # negative: cut that many bytes off the end

    return edit


def _garbage_header(d: Path) -> None:
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff\xfe not json"
    path.write_bytes(bytes(data))


def _remove_shard(d: Path) -> None:
    (d / "model-00002-of-00002.safetensors").unlink()


def _misindex(d: Path) -> None:
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))


def _ct_names(t: dict) -> None:
    t[f"{UP}.weight_global_scale"] = 1.0 / t.pop(f"{UP}.weight_scale_2")


CASES = [
    Broken(
        "missing-weight-scale",
        rf"missing {UP}\.weight_scale: a packed NVFP4 weight needs float8_e4m3fn block "
        r"scales \[32, 4\]",
        f"{UP}.weight",
        tensors=_drop(f"{UP}.weight_scale"),
    ),  # fmt: skip
    Broken(
        "missing-weight-scale-2",
        rf"missing {UP}\.weight_scale_2: NVFP4 needs a global scale",
        f"{UP}.weight",
        tensors=_drop(f"{UP}.weight_scale_2"),
    ),  # fmt: skip
    Broken(
        "scale-dtype",
        r"wrong dtype F32 for NVFP4 block scales, expected F8_E4M3",
        f"{UP}.weight_scale",
        tensors=lambda t: t.update({f"{UP}.weight_scale": t[f"{UP}.weight_scale"].float()}),
    ),  # fmt: skip
    Broken(
        "scale-shape",
        r"wrong shape \[32, 2\] for NVFP4 block scales, expected \[N, K/16\] = \[32, 4\] for "
        r"packed weight \[32, 32\]",
        f"{UP}.weight_scale",
        tensors=lambda t: t.update({f"{UP}.weight_scale": t[f"{UP}.weight_scale"][:, :2].contiguous()}),
    ),  # fmt: skip
    Broken(
        "k-not-multiple-of-16",
        r"K = 24 \(packed weight \[32, 12\] = \[N, K/2\]\) is not a multiple of 16",
        f"{UP}.weight",
        tensors=_k24,
    ),  # fmt: skip
    Broken(
        "global-dtype",
        r"wrong dtype BF16 for a global scale, expected F32",
        f"{UP}.weight_scale_2",
        tensors=lambda t: t.update({f"{UP}.weight_scale_2": t[f"{UP}.weight_scale_2"].bfloat16()}),
    ),  # fmt: skip
    Broken(
        "global-nan",
        r"global scale contains NaN \(1 of 1 values\)",
        f"{UP}.weight_scale_2",
        tensors=_set(f"{UP}.weight_scale_2", torch.tensor([float("nan")])),
    ),  # fmt: skip
    Broken(
        "global-inf",
        r"global scale contains inf",
        f"{UP}.weight_scale_2",
        tensors=_set(f"{UP}.weight_scale_2", torch.tensor([float("inf")])),
    ),  # fmt: skip
    Broken(
        "global-negative",
        r"global scale is negative \(min -0\.001\)",
        f"{UP}.weight_scale_2",
        tensors=_set(f"{UP}.weight_scale_2", torch.tensor([-1e-3])),
    ),  # fmt: skip
    Broken(
        "global-zero",
        r"global scale is zero",
        f"{UP}.weight_scale_2",
        tensors=_set(f"{UP}.weight_scale_2", torch.tensor([0.0])),
    ),  # fmt: skip
    Broken(
        "block-scale-nan",
        r"block scales contains NaN \(1 of 128 values\)",
        f"{UP}.weight_scale",
        tensors=_scale_byte(0x7F),
    ),  # fmt: skip
    Broken(
        "block-scale-negative", r"block scales is negative", f"{UP}.weight_scale", tensors=_scale_byte(0xB8)
    ),
    Broken(
        "input-scale-nan",
        r"input scale contains NaN",
        f"{UP}.input_scale",
        tensors=_set(f"{UP}.input_scale", torch.tensor([float("nan")])),
    ),  # fmt: skip
    Broken(
        "missing-input-scale",
        r"missing input scale: .*config\.json says NVFP4 W4A4 \(NVFP4\)",
        f"{UP}.weight",
        tensors=_drop(f"{UP}.input_scale"),
    ),  # fmt: skip
    Broken(
        "fused-shards-differ",
        rf"shards of fused module {ATTN}\.qkv_proj have different schemes \(q_proj=nvfp4, "
        r"k_proj=fp8, v_proj=nvfp4\)",
        f"{ATTN}.q_proj.weight",
        tensors=_mixed_qkv,
        config=_mixed_config,
    ),  # fmt: skip
    Broken(
        "unknown-quant-algo",
        r"field quantization_config\.quant_algo: unknown quant_algo 'NVFP8'",
        None,
        "config.json",
        config=lambda c: {**c, "quant_algo": "NVFP8"},
    ),  # fmt: skip
    Broken(
        "config-says-fp8",
        r"config and tensors disagree: .*config\.json says fp8 but the stored tensors are "
        r"nvfp4 \(weight dtype U8",
        "model.layers.0.mlp.down_proj.weight",
        config=lambda c: {**c, "quant_algo": "FP8"},
    ),  # fmt: skip
    Broken(
        "config-quantizes-bf16-layer",
        r"says nvfp4 but the stored tensors are unquantized \(weight dtype BF16",
        "lm_head.weight",
        config=lambda c: {**c, "exclude_modules": []},
    ),  # fmt: skip
    Broken(
        "packed-but-excluded",
        r"missing weight_scale: weight is packed U8 \(NVFP4\) but there is no "
        r"weight_scale tensor",
        f"{UP}.weight",
        tensors=_drop(f"{UP}.weight_scale"),
        config=lambda c: {**c, "exclude_modules": ["lm_head", UP]},
    ),  # fmt: skip
    Broken(
        "convention-mismatch",
        r"weight_global_scale is the compressed_tensors name but .*config\.json is a "
        r"modelopt checkpoint",
        f"{UP}.weight_global_scale",
        tensors=_ct_names,
    ),  # fmt: skip
    Broken(
        "bad-weight-dtype",
        r"weight dtype I32 is none of U8 \(NVFP4\), F8_E4M3 \(FP8\) or a float type",
        "lm_head.weight",
        tensors=lambda t: t.update({"lm_head.weight": torch.zeros(8, 64, dtype=torch.int32)}),
    ),  # fmt: skip
    Broken(
        "truncated-data",
        r"truncated safetensors file: tensor data ends at byte \d+, the file has \d+ bytes",
        f"{ATTN}.v_proj.weight",
        "model.safetensors",
        files=_truncate(-100),
    ),  # fmt: skip
    Broken(
        "truncated-header",
        r"truncated or corrupt safetensors file: header claims \d+ bytes, the file has 40",
        None,
        "model.safetensors",
        files=_truncate(40),
    ),  # fmt: skip
    Broken(
        "tiny-file",
        r"truncated safetensors file: 3 bytes, shorter than the 8-byte header size",
        None,
        "model.safetensors",
        files=_truncate(3),
    ),  # fmt: skip
    Broken(
        "corrupt-header",
        r"corrupt safetensors file: the header is not valid JSON",
        None,
        "model.safetensors",
        files=_garbage_header,
    ),  # fmt: skip
    Broken(
        "index-missing-shard",
        r"weight_map points to missing shard model-00002-of-00002\.safetensors",
        "model.embed_tokens.weight",
        "model.safetensors.index.json",
        files=_remove_shard,
        shards=2,
    ),  # fmt: skip
    Broken(
        "index-wrong-shard",
        r"weight_map maps the tensor to model-00002-of-00002\.safetensors, which does not "
        r"contain it",
        "lm_head.weight",
        "model.safetensors.index.json",
        files=_misindex,
        shards=2,
    ),  # fmt: skip
    Broken(
        "config-not-json",
        r"not valid JSON",
        None,
        "config.json",
        files=lambda d: (d / "config.json").write_text("{'quant_method': modelopt"),
    ),  # fmt: skip
    Broken(
        "no-weights",
        r"no model\.safetensors, model\.safetensors\.index\.json or \*\.safetensors file",
        None,
        None,
        files=lambda d: (d / "model.safetensors").unlink(),
    ),  # fmt: skip
]


def _build(case: Broken, root: Path) -> Path:
    tensors = dense_nvfp4_tensors()
    case.tensors(tensors)
    directory = write_checkpoint(root / case.id, tensors, case.config(nvfp4_config()), shards=case.shards)
    case.files(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    return {case.id: _build(case, root) for case in CASES}


def test_corpus_is_large_and_every_message_distinct() -> None:
    assert len(CASES) >= 15
    assert len({case.message for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_broken_checkpoint_error(
    case: Broken, corpus: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    directory = corpus[case.id]
    with pytest.raises(CheckpointError, match=case.message) as info:
        validate_checkpoint(directory)
    error = info.value
    assert error.tensor == case.tensor
    if case.file is not None:
        assert error.file is not None and Path(error.file).name == case.file
    if case.tensor is not None:
        assert f"tensor {case.tensor}" in str(error)
    assert main(["inspect", str(directory)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no partial table
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {error}"


def test_console_script_exit_status_without_traceback(corpus: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nvfp4_ext", "inspect", str(corpus["corrupt-header"]), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: file ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_good_base_checkpoint_is_valid(tmp_path: Path) -> None:
    ckpt = validate_checkpoint(write_checkpoint(tmp_path / "ok", dense_nvfp4_tensors(), nvfp4_config()))
    assert {r.scheme for r in ckpt.modules()} == {"nvfp4", "unquantized"}
