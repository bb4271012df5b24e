"""Checkpoint reader: single/sharded files, lazy reads, module records, dequantization, both conventions."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    build_mixed,
    ct_nvfp4_config,
    dense_nvfp4_tensors,
    fp8_tensors,
    mixed_tensors,
    nvfp4_config,
    nvfp4_tensors,
    write_checkpoint,
)
from safetensors.torch import load_file

from nvfp4_ext.checkpoint import safetensors_file
from nvfp4_ext.checkpoint.reader import Checkpoint
from nvfp4_ext.checkpoint.validate import validate_checkpoint
from nvfp4_ext.format import dequantize_fp8, dequantize_nvfp4, quantize_nvfp4


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mixed(tmp_path_factory.mktemp("mixed") / "ckpt", shards=3)


@pytest.fixture(scope="module")
def mixed(mixed_dir: Path) -> Checkpoint:
    return validate_checkpoint(mixed_dir)


def test_sharded_and_single_read_the_same_tensors(mixed: Checkpoint, tmp_path: Path) -> None:
    tensors, _ = mixed_tensors()
    single = Checkpoint.open(write_checkpoint(tmp_path / "single", tensors, None))
    assert len(mixed.files) == 3 and len(single.files) == 1
    assert mixed.tensor_names() == single.tensor_names() == sorted(tensors)
    reference = {}
    for path in mixed.files:
        reference.update(load_file(path))
    for name in mixed.tensor_names():
        got = mixed.get(name)
        assert got.dtype == reference[name].dtype and got.shape == reference[name].shape
        as_bytes = got.reshape(-1).view(torch.uint8)
        assert torch.equal(as_bytes, reference[name].reshape(-1).view(torch.uint8)), name
        assert torch.equal(single.get(name).reshape(-1).view(torch.uint8), as_bytes)


def test_tensor_info_from_headers(mixed: Checkpoint) -> None:
    info = mixed.tensor_info("model.layers.1.mlp.experts.gate_up_proj")
    assert (info.dtype, info.shape) == ("U8", (4, 64, 32))
    assert Path(info.file).name.startswith("model-0000")
    assert mixed.tensor_info("model.layers.1.mlp.experts.gate_up_proj_weight_scale").dtype == "F8_E4M3"
    expert = mixed.get_rows("model.layers.1.mlp.experts.gate_up_proj", 2, 3)
    assert torch.equal(expert[0], mixed.get("model.layers.1.mlp.experts.gate_up_proj")[2])


def test_get_reads_only_the_tensor(mixed: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """One tensor costs one read of exactly its bytes: never the whole shard."""
    reads: list[int] = []

    class CountingFile:
        def __init__(self, f) -> None:
            self._f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self._f.close()

        def seek(self, offset: int) -> int:
            return self._f.seek(offset)

        def read(self, n: int = -1) -> bytes:
            data = self._f.read(n)
            reads.append(len(data))
            return data

    def counting_open(*args, **kwargs) -> CountingFile:
        return CountingFile(builtins.open(*args, **kwargs))  # noqa: SIM115 - closed by CountingFile.__exit__

    monkeypatch.setattr(safetensors_file, "open", counting_open, raising=False)
    name = "model.layers.0.mlp.experts.2.down_proj.weight_scale"
    mixed.get(name)
    assert reads == [mixed.tensor_info(name).nbytes]


def test_mixed_module_records(mixed: Checkpoint) -> None:
    by_name = {r.name: r for r in mixed.modules()}
    assert by_name["model.layers.0.self_attn.q_proj"].scheme == "fp8"
    assert by_name["model.layers.0.mlp.experts.3.up_proj"].scheme == "nvfp4"
    assert by_name["model.layers.0.mlp.experts.3.up_proj"].shape == (32, 64)
    fused = by_name["model.layers.1.mlp.experts.gate_up_proj"]
    assert (fused.scheme, fused.shape, fused.is_expert) == ("nvfp4", (4, 64, 64), True)
    assert fused.tensors["weight_global"] == "model.layers.1.mlp.experts.gate_up_proj_weight_scale_2"
    assert by_name["lm_head"].reason == "named in the exclude list"
    assert by_name["model.layers.1.mlp.router"].reason == "excluded by pattern '*router*'"
    assert by_name["model.embed_tokens"].reason == "embedding"
    assert "model.norm" not in by_name  # 1-D tensors are not modules
    assert len(by_name) == 2 + 2 * 5 + 12 + 2


def test_dequantized_weight_every_scheme(mixed: Checkpoint) -> None:
    tensors, originals = mixed_tensors()
    q = "model.layers.0.self_attn.q_proj"
    expected = dequantize_fp8(tensors[f"{q}.weight"], tensors[f"{q}.weight_scale"])
    assert torch.equal(mixed.dequantized_weight(q), expected)
    e = "model.layers.0.mlp.experts.1.down_proj"
    expected = dequantize_nvfp4(
        tensors[f"{e}.weight"], tensors[f"{e}.weight_scale"], tensors[f"{e}.weight_scale_2"]
    )
    assert torch.equal(mixed.dequantized_weight(e), expected)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    reference = quantize_nvfp4(originals[fused]).dequantize()
    assert torch.equal(mixed.dequantized_weight(fused), reference)
    assert torch.equal(mixed.dequantized_weight("lm_head"), tensors["lm_head.weight"].float())
    # Every scheme stays within its format's worst case relative to amax: NVFP4 half a step at the top of
    # a block (1/6 of the block amax, +1/16 for the e4m3 scale rounding), FP8 e4m3 1/16.
    for name, w in originals.items():
        err = (mixed.dequantized_weight(name) - w).abs().max() / w.abs().max()
        assert err <= (1 / 6 * (1 + 1 / 16) if "experts" in name else 1 / 16), name


def test_compressed_tensors_and_modelopt_dequantize_identically(tmp_path: Path) -> None:
    """Same weights, both conventions: codes and block scales byte-identical, global scales reciprocal.

    The dequantized tensors are identical wherever the stored divisor round-trips to the same float32
    multiplier (1 / (1 / m) == m in float32; always so for power-of-two multipliers); otherwise the
    multiplier differs by one float32 rounding and so does each value (relative error <= 2**-23).
    """
    modelopt = Checkpoint.open(write_checkpoint(tmp_path / "mo", dense_nvfp4_tensors(3), nvfp4_config()))
    compressed = Checkpoint.open(
        write_checkpoint(
            tmp_path / "ct", dense_nvfp4_tensors(3, convention="compressed_tensors"), ct_nvfp4_config()
        )
    )
    assert compressed.quant_config.global_scale_convention == "compressed_tensors"
    mo_records = {r.name: r for r in modelopt.modules()}
    ct_records = {r.name: r for r in compressed.modules()}
    assert {n: (r.scheme, r.shape) for n, r in mo_records.items()} == {
        n: (r.scheme, r.shape) for n, r in ct_records.items()
    }
    exact = 0
    for name, record in mo_records.items():
        a, b = modelopt.dequantized_weight(name), compressed.dequantized_weight(name)
        if record.scheme == "unquantized":
            assert torch.equal(a, b)
            continue
        assert torch.equal(modelopt.get(f"{name}.weight"), compressed.get(f"{name}.weight_packed"))
        assert torch.equal(modelopt.get(f"{name}.weight_scale").view(torch.uint8),
                           compressed.get(f"{name}.weight_scale").view(torch.uint8))  # fmt: skip
        m = modelopt.get(f"{name}.weight_scale_2")
        stored = compressed.get(f"{name}.weight_global_scale")
        if (1.0 / stored.double()).float().item() == m.item():
            assert torch.equal(a, b), name
            exact += 1
        else:
            torch.testing.assert_close(a, b, rtol=2**-23, atol=0)
    assert exact >= 1


def test_power_of_two_global_scales_are_exact_in_both_conventions(tmp_path: Path) -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    w = w / w.abs().max() * (2688 * 2.0**-10)  # amax / 2688 = 2**-10 exactly
    mo = write_checkpoint(tmp_path / "mo", nvfp4_tensors("model.layers.0.mlp.down_proj", w), nvfp4_config())
    ct_tensors = nvfp4_tensors("model.layers.0.mlp.down_proj", w, convention="compressed_tensors")
    ct = write_checkpoint(tmp_path / "ct", ct_tensors, ct_nvfp4_config())
    assert ct_tensors["model.layers.0.mlp.down_proj.weight_global_scale"].item() == 1024.0
    a = Checkpoint.open(mo).dequantized_weight("model.layers.0.mlp.down_proj")
    b = Checkpoint.open(ct).dequantized_weight("model.layers.0.mlp.down_proj")
    assert torch.equal(a, b)


def test_legacy_hf_quant_config_directory(tmp_path: Path) -> None:
    legacy = {
        "producer": {"name": "modelopt"},
        "quantization": {**nvfp4_config(), "kv_cache_quant_algo": None},
    }
    legacy["quantization"].pop("quant_method")
    ckpt = Checkpoint.open(
        write_checkpoint(tmp_path / "c", dense_nvfp4_tensors(), None, hf_quant_config=legacy)
    )
    assert ckpt.quant_config.source.endswith("hf_quant_config.json")
    schemes = {r.name: r.scheme for r in ckpt.modules()}
    assert schemes["model.layers.0.self_attn.k_proj"] == "nvfp4"
    assert schemes["lm_head"] == "unquantized"


def test_unquantized_checkpoint(tmp_path: Path) -> None:
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 16), "model.norm.weight": torch.ones(16)}
    ckpt = validate_checkpoint(write_checkpoint(tmp_path / "c", tensors, None))
    assert ckpt.quant_config is None
    (record,) = ckpt.modules()
    assert (record.scheme, record.reason) == ("unquantized", "checkpoint has no quantization config")


def test_engines_never_quantize_vision_towers_and_embeddings(tmp_path: Path) -> None:
    tensors = dense_nvfp4_tensors()
    tensors["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] = torch.randn(16, 32).bfloat16()
    tensors["model.encoder.embed_vision.embedding_projection.weight"] = torch.randn(64, 16).bfloat16()
    tensors["model.audio.subsample.conv.weight"] = torch.randn(8, 1, 3, 3).bfloat16()
    ckpt = validate_checkpoint(write_checkpoint(tmp_path / "c", tensors, nvfp4_config(exclude=["lm_head"])))
    reasons = {r.name: r.reason for r in ckpt.modules() if r.scheme == "unquantized"}
    assert reasons == {
        "lm_head": "named in the exclude list",
        "model.embed_tokens": "embedding",
        "model.vision_tower.encoder.layers.0.mlp.fc1": "vision_tower (engines keep it unquantized)",
        "model.encoder.embed_vision.embedding_projection": "embed_vision (engines keep it unquantized)",
        "model.audio.subsample.conv": "not a linear layer (4-D weight)",
    }


@pytest.mark.parametrize(("algo", "scheme"), [("FP8_PB_WO", "fp8_block"), ("FP8", "fp8")])
def test_fp8_weight_within_one_block_follows_the_config(tmp_path: Path, algo: str, scheme: str) -> None:
    """A [64, 128] weight has a [1, 1] block grid: that scale reads as per-tensor or as 128x128 block."""
    w = torch.randn(64, 128)
    tensors = {**fp8_tensors("model.layers.0.self_attn.k_proj", w, "block")}
    assert tensors["model.layers.0.self_attn.k_proj.weight_scale"].shape == (1, 1)
    ckpt = validate_checkpoint(
        write_checkpoint(tmp_path / "c", tensors, {"quant_method": "modelopt", "quant_algo": algo})
    )
    (record,) = ckpt.modules()
    assert record.scheme == scheme
    torch.testing.assert_close(ckpt.dequantized_weight(record.name), w, rtol=1 / 16, atol=w.abs().max() / 448)


def test_compressed_tensors_targets_do_not_cover_a_bf16_conv1d(tmp_path: Path) -> None:
    """compressed-tensors quantizes only the nn.Linear modules its targets match: Qwen3.5's GDN `conv1d`
    ([C, 1, K], an nn.Conv1d) stays BF16 in llm-compressor 0.14's checkpoints under `targets: ["Linear"]` and
    under `re:.*linear_attn\\..*` alike. A 2-D BF16 weight under the same target is still a disagreement."""
    from nvfp4_ext.errors import CheckpointError

    conv = "model.layers.0.linear_attn.conv1d"
    tensors = dense_nvfp4_tensors(convention="compressed_tensors")
    tensors[f"{conv}.weight"] = torch.randn(64, 1, 4).bfloat16()
    regex = ct_nvfp4_config()
    targets = [r"re:.*self_attn\..*", r"re:.*mlp\..*", r"re:.*linear_attn\..*"]
    regex["config_groups"]["group_0"]["targets"] = targets
    for name, config in (("class", ct_nvfp4_config()), ("regex", regex)):
        ckpt = validate_checkpoint(write_checkpoint(tmp_path / name, tensors, config))
        record = {r.name: r for r in ckpt.modules()}[conv]
        assert record.scheme == "unquantized" and "not an nn.Linear (3-D weight)" in (record.reason or "")

    extra = {**tensors, "model.layers.0.mlp.extra_proj.weight": torch.randn(32, 64).bfloat16()}
    with pytest.raises(CheckpointError, match=r"extra_proj.*config and tensors disagree.*nvfp4 but the"):
        validate_checkpoint(write_checkpoint(tmp_path / "linear", extra, ct_nvfp4_config()))
