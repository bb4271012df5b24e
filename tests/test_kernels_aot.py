"""Ahead-of-time compilation of every shipped kernel configuration for sm_80, sm_90 and sm_100 (no GPU).

`triton.compile` produces the PTX a real launch would, and Triton's bundled `ptxas-blackwell -v` reports its
registers and spills. Spilled registers go through local memory, which costs bandwidth exactly where the
memory-bound decode kernels have none to spare, so any spill fails the test.
"""

from __future__ import annotations

import argparse
import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="AOT compilation needs real (non-interpreted) kernels"
)
triton = pytest.importorskip("triton")

from nvfp4_ext.kernels import report  # noqa: E402

CAPABILITIES = (80, 90, 100)


@pytest.fixture(scope="module")
def results():
    # The opt-in PTX-decode variants only for sm_90 here, to keep the suite short; the CLI covers all.
    return report.compile_all(CAPABILITIES, fast_decode_capabilities=(90,))


def test_every_shipped_variant_compiles_for_every_arch(results):
    variants = report.shipped_variants()
    kernels = {v.kernel for v in variants}
    assert kernels == {"nvfp4_gemm", "nvfp4_moe_gate_up", "nvfp4_moe_down", "fp8_gemm"}
    fast = [v for v in variants if "fast-decode" in v.config]
    assert fast, "the PTX-decode variants are part of the report"
    assert len(results) == (len(variants) - len(fast)) * len(CAPABILITIES) + len(fast)
    assert {r.arch for r in results} == {"sm_80", "sm_90a", "sm_100a"}
    for r in results:
        assert 0 < r.registers <= 255 and r.smem_bytes > 0, r
        assert r.ctas_per_sm >= 1, f"{r.kernel} [{r.config}] cannot be resident on {r.arch}: {r}"
        # The K loop was found in the SASS: decoding a weight costs instructions, and so does the dot.
        assert r.loop_sass_per_weight is not None and r.loop_sass_per_weight > 1, r


def test_no_shipped_config_spills(results):
    spilled = [
        f"{r.kernel} [{r.config}] {r.arch}: {r.spill_stores}/{r.spill_loads} B" for r in results if r.spills
    ]
    assert not spilled, "register spills: " + "; ".join(spilled)


def test_shipped_tables_cover_diffusiongemma_shapes():
    from nvfp4_ext.kernels.nvfp4_gemm_kernel import shipped_configs

    used = {u for v in report.shipped_variants() for u in v.used_by}
    for name, _, _ in shipped_configs():
        assert any(u.startswith(name) for u in used), name
    assert any("E=128 H=2816 I=704" in u for u in used)


def test_occupancy_estimate_follows_the_limits():
    # 128 registers x 128 threads = 16K registers -> 4 CTAs; 255 registers x 256 threads -> 1 CTA.
    assert report.occupancy(128, 32 * 1024, 4, 90) == (4, 0.25)
    assert report.occupancy(255, 40 * 1024, 8, 90)[0] == 1
    # Shared memory bounds: 100 KiB per CTA fits once in sm_80's 164 KiB, twice in sm_90's 228 KiB.
    assert report.occupancy(32, 100 * 1024, 4, 80)[0] == 1
    assert report.occupancy(32, 100 * 1024, 4, 90)[0] == 2


def test_report_command_prints_the_table(capsys):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    status = report.run(parser.parse_args(["--arch", "90", "--kernel", "fp8_gemm"]))
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("| kernel | config | arch | registers |")
    assert out.count("| fp8_gemm |") == len([v for v in report.shipped_variants() if v.kernel == "fp8_gemm"])
