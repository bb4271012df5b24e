"""Benchmark the NVFP4 W4A16 Triton GEMM on DiffusionGemma's linear layers.

    python benchmarks/bench_gemm.py                       # all shapes, M in 1 4 16 64 256 2048, bf16
    python benchmarks/bench_gemm.py --shapes o_sliding lm_head --m 1 16 --out /tmp/gemm

Providers (each checked against `nvfp4_gemm_ref` before it is timed):
  * bf16 (fp16)    torch matmul on the dequantized weight at 16 bits: the baseline of every speedup;
  * dequant+bf16   dequantize the NVFP4 weight to BF16 on every call, then matmul (the naive path);
  * nvfp4-triton   our kernel (`nvfp4_ext.kernels.nvfp4_gemm`, backend "triton");
  * nvfp4-triton-portable  the same with the portable weight decode (NVFP4_EXT_MARLIN_DECODE=0);
  * marlin         vLLM's Marlin NVFP4 W4A16 kernel, when vLLM (CUDA build) is importable.
Timing: `triton.testing.do_bench` median and p20/p80 (L2 flushed between runs). Output: a table on stdout,
`benchmarks/results/<gpu>/gemm-<date>.json` (env block + rows) and a PNG of speedup vs M.

Goals (for a GPU run; not asserted anywhere): at M <= 16 the kernel reads 4.5 bits per weight instead of
16, so it should reach >= 3.2x the BF16 matmul (the bandwidth limit is 3.56x) and be no slower than Marlin;
at large M it is compute-bound on FP16/BF16 tensor cores plus the in-register dequant, so ~0.7-1.0x BF16
is expected there. On a machine without a GPU this script says so and runs a Triton-interpreter smoke check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from nvfp4_ext.kernels import benchmarking as bench
from nvfp4_ext.kernels.shapes import DIFFUSIONGEMMA_GEMM_SHAPES

M_VALUES = (1, 4, 16, 64, 256, 2048)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def parse_args(shape_names: list[str], argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=shape_names, choices=shape_names)
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="batch sizes (tokens)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, help="directory for JSON and PNG (default benchmarks/results/<gpu>)"
    )
    return parser.parse_args(argv)


def make_marlin(qdata, scale, global_scale, n, k, dtype):
    """A callable running vLLM's Marlin NVFP4 GEMM on our weight, or a string saying why there is none."""
    try:
        from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_make_workspace_new
        from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import (
            apply_fp4_marlin_linear,
            prepare_fp4_layer_for_marlin,
        )
    except Exception as exc:  # any import failure means "not available here", reported in the table
        return f"vLLM Marlin not importable ({type(exc).__name__})"
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(qdata.clone(), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scale.clone(), requires_grad=False)
    layer.weight_global_scale = torch.nn.Parameter(global_scale.float().reshape(()), requires_grad=False)
    layer.output_size_per_partition, layer.input_size_per_partition = n, k
    layer.params_dtype = dtype
    try:
        prepare_fp4_layer_for_marlin(layer)
        workspace = marlin_make_workspace_new(qdata.device)
    except Exception as exc:
        return f"Marlin repack failed: {exc}"
    return lambda x: apply_fp4_marlin_linear(
        x, layer.weight, layer.weight_scale, layer.weight_global_scale, workspace, n, k
    )


def bench_shape(
    name: str, n: int, k: int, m_values: list[int], dtype: torch.dtype, device: str = "cuda"
) -> list[bench.BenchRow]:
    """Check, then time, every provider at each M for one (N, K)."""
    from nvfp4_ext.kernels import nvfp4_gemm, nvfp4_gemm_ref
    from nvfp4_ext.kernels.nvfp4_words import pack_nvfp4_weights

    from nvfp4_ext.format import dequantize_nvfp4, quantize_nvfp4

    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    q = quantize_nvfp4(w)
    w_dense = q.dequantize(dtype)  # the baseline multiplies the same values, at 16 bits each
    packed = pack_nvfp4_weights(q.qdata, q.scale)
    marlin = make_marlin(q.qdata, q.scale, q.global_scale, n, k, dtype) if device == "cuda" else "needs CUDA"
    providers = {
        DTYPE_NAMES[dtype]: lambda x: torch.nn.functional.linear(x, w_dense),
        "dequant+bf16": lambda x: torch.nn.functional.linear(
            x, dequantize_nvfp4(q.qdata, q.scale, q.global_scale, dtype=dtype)
        ),
        # Packed once, as the engine adapters do at load (the launcher would repack checkpoint bytes per call).
        "nvfp4-triton": lambda x: nvfp4_gemm(x, *packed, q.global_scale, backend="triton"),
    }
    if device == "cuda" and dtype == torch.bfloat16:
        providers["nvfp4-triton-portable"] = bench.with_portable_decode(providers["nvfp4-triton"])
    if callable(marlin):
        providers["marlin"] = marlin
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device=device, dtype=dtype)
        expected = nvfp4_gemm_ref(x, q.qdata, q.scale, q.global_scale)
        weight_bytes = {DTYPE_NAMES[dtype]: 2 * n * k}
        baseline = None
        for provider, fn in providers.items():
            row = bench.BenchRow(shape=f"{name} N={n} K={k}", m=m, provider=provider)
            try:
                row.rel_error = bench.relative_error(fn(x), expected)
                row.median_us, row.p20_us, row.p80_us = bench.time_us(
                    lambda fn=fn, x=x: fn(x), cuda=device == "cuda"
                )
            except Exception as exc:  # a failing provider is reported, not fatal to the sweep
                row.note = f"failed: {exc}"
                rows.append(row)
                continue
            moved = weight_bytes.get(provider, n * k * 9 // 16) + 2 * m * (k + n)
            row.tflops = 2 * m * n * k / (row.median_us * 1e-6) / 1e12
            row.gbps = moved / (row.median_us * 1e-6) / 1e9
            baseline = baseline or row.median_us
            row.speedup = baseline / row.median_us
            rows.append(row)
        if not callable(marlin):
            rows.append(bench.BenchRow(shape=f"{name} N={n} K={k}", m=m, provider="marlin", note=marlin))
    return rows


def cpu_smoke() -> int:
    """The benchmark's own code path on a tiny shape through the interpreter: correctness, no timing."""
    print(bench.cpu_smoke_banner("bench_gemm"))
    rows = bench_shape("smoke", 48, 160, [1, 16, 33], torch.float16, device="cpu")
    print_table(rows)
    failed = [
        r for r in rows if r.note.startswith("failed") or (r.rel_error is not None and r.rel_error > 1e-2)
    ]
    print("smoke: " + ("FAILED" if failed else "ok (CPU times above are interpreter times, not performance)"))
    return 1 if failed else 0


def print_table(rows: list[bench.BenchRow]) -> None:
    print("| shape | M | provider | median us | p20-p80 us | TFLOP/s | GB/s | speedup | rel err | note |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r.median_us is None:
            print(f"| {r.shape} | {r.m} | {r.provider} | | | | | | | {r.note} |")
            continue
        print(
            f"| {r.shape} | {r.m} | {r.provider} | {r.median_us:.1f} | {r.p20_us:.1f}-{r.p80_us:.1f} | "
            f"{r.tflops:.2f} | {r.gbps:.0f} | {r.speedup:.2f}x | {r.rel_error:.1e} | {r.note} |"
        )


def main(argv: list[str] | None = None) -> int:
    shapes = {name: (n, k) for name, n, k in DIFFUSIONGEMMA_GEMM_SHAPES}
    args = parse_args(list(shapes), argv)
    if bench.set_interpreter_for_cpu():
        return cpu_smoke()
    torch.manual_seed(args.seed)
    env = bench.environment(vars(args) | {"out": str(args.out) if args.out else None})
    print(
        f"Run environment: {env['gpu']} (sm_{''.join(map(str, env['capability']))}), torch {env['torch']}, "
        f"triton {env['triton']}, vllm {env['vllm']}, git {env['git_sha']}"
    )
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, *shapes[name], args.m, DTYPES[args.dtype])
    print_table(rows)
    path = bench.write_results("gemm", rows, env, args.out)
    plot = bench.plot_speedups(
        [r for r in rows if r.provider != args.dtype],
        f"NVFP4 GEMM vs {args.dtype} matmul",
        path.with_suffix(".png"),
    )
    print(f"wrote {path}" + (f" and {plot}" if plot else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
