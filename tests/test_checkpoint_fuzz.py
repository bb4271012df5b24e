"""Fuzzing: whatever happens to the bytes of a checkpoint or the shape of its config, reading and validating
it either succeeds or raises CheckpointError - never another exception, never a hang."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoint_factory import dense_nvfp4_tensors, nvfp4_config, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvfp4_ext.checkpoint.config import parse_quant_config
from nvfp4_ext.checkpoint.validate import validate_checkpoint
from nvfp4_ext.errors import CheckpointError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fuzz") / "good", dense_nvfp4_tensors(), nvfp4_config())


def _read_everything(directory: Path) -> None:
    ckpt = validate_checkpoint(directory)
    for record in ckpt.modules():
        ckpt.dequantized_weight(record.name)


@FUZZ
@given(data=st.data())
def test_corrupted_bytes_only_raise_checkpoint_error(good: Path, tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray((good / "model.safetensors").read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    mode = data.draw(st.sampled_from(["truncate", "flip-header", "flip-prefix", "flip-data", "splice-json"]))
    if mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mode == "flip-header":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(8, header_end - 1))] = data.draw(st.integers(0, 255))
    elif mode == "flip-prefix":
        raw[data.draw(st.integers(0, 7))] = data.draw(st.integers(0, 255))
    elif mode == "flip-data":
        for _ in range(data.draw(st.integers(1, 16))):
            raw[data.draw(st.integers(header_end, len(raw) - 1))] = data.draw(st.integers(0, 255))
    else:  # a syntactically valid header with hostile values
        header = json.loads(raw[8:header_end])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(
            st.one_of(
                st.none(),
                st.integers(-5, 10**12),
                st.text(max_size=4),
                st.lists(st.integers(-3, 10**6), max_size=4),
            )  # fmt: skip
        )
        blob = json.dumps(header).encode()
        raw = bytearray(len(blob).to_bytes(8, "little")) + blob + raw[header_end:]
    directory = tmp_path / f"case-{data.draw(st.integers(0, 10**9))}"
    shutil.copytree(good, directory)
    (directory / "model.safetensors").write_bytes(bytes(raw))
    try:
        _read_everything(directory)
    except CheckpointError as exc:
        assert exc.file is not None
    finally:
        shutil.rmtree(directory)


LEAVES = ["NVFP4", "FP8", "MIXED_PRECISION", "modelopt", "compressed-tensors", "Linear", "re:(", "re:.*", "*"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 64) | st.text(max_size=6) | st.sampled_from(LEAVES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
config_keys = st.sampled_from([
    "quant_method", "quant_algo", "group_size", "ignore", "exclude_modules", "kv_cache_scheme",
    "kv_cache_quant_algo", "quantized_layers", "config_groups", "format", "producer", "quantization",
])  # fmt: skip


@FUZZ
@given(
    st.dictionaries(config_keys, json_values, max_size=6),
    st.sampled_from(["a.q_proj", "x.experts.gate_up_proj"]),
)
def test_hostile_configs_only_raise_checkpoint_error(cfg: dict, module: str) -> None:
    try:
        q = parse_quant_config(cfg, "config.json")
        q.scheme_for(module)
        q.excluded_by(module)
    except CheckpointError as exc:
        assert exc.file == "config.json"
