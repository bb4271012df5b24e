"""Benchmark the fused NVFP4 MoE Triton kernels on DiffusionGemma's experts (E=128, H=2816, I=704, top-8).

    python benchmarks/bench_moe.py                     # M in 1 4 16 64 256 2048, bf16, gelu_tanh
    python benchmarks/bench_moe.py --m 1 32 --experts 128 --hidden 2816 --inter 352   # TP=2 shard

Providers (each checked against `nvfp4_moe_ref` before it is timed):
  * bf16-triton     vLLM's BF16 Triton `fused_experts` on the dequantized weights: the baseline;
  * dequant-first   dequantize all experts to BF16 on every call, then vLLM's `fused_experts`;
  * nvfp4-triton    our fused kernels (`nvfp4_ext.kernels.nvfp4_moe`, backend "triton");
  * nvfp4-triton-portable  the same with the portable weight decode (NVFP4_EXT_MARLIN_DECODE=0);
  * torch-ref       `nvfp4_moe_ref` (capture-safe: one expert per (token, slot) pair while T*k <= E, else
                    every expert over all tokens, dequantized one at a time).
The vLLM providers need vLLM's CUDA build; without it the table says so. Timing: `triton.testing.do_bench`
median and p20/p80. Output: a table on stdout, `benchmarks/results/<gpu>/moe-<date>.json` and a PNG.

Goals (for a GPU run; not asserted): at M <= 32 the step reads top-k experts' weights, so the NVFP4 kernels
should take <= 0.5x the BF16 Triton MoE time (3.56x fewer weight bytes, minus dequant and launch overhead),
and be ~10x faster than dequantize-first (vLLM reports 10.8x for its NVFP4 Triton MoE). Anchor: the BF16
Triton MoE on this shape takes 185 us at M=1 and 325 us at M=32 on an H200 (vLLM PR #44818).
On a machine without a GPU this script says so and runs the same code on a tiny MoE in the interpreter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from nvfp4_ext.kernels import benchmarking as bench
from nvfp4_ext.kernels.shapes import DIFFUSIONGEMMA_MOE_SHAPE

M_VALUES = (1, 4, 16, 64, 256, 2048)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    shape = DIFFUSIONGEMMA_MOE_SHAPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="tokens per step")
    parser.add_argument("--experts", type=int, default=shape["num_experts"])
    parser.add_argument("--hidden", type=int, default=shape["hidden"])
    parser.add_argument("--inter", type=int, default=shape["intermediate"], help="expert intermediate size")
    parser.add_argument("--top-k", type=int, default=shape["top_k"])
    parser.add_argument("--activation", choices=("gelu_tanh", "silu"), default="gelu_tanh")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, help="directory for JSON and PNG (default benchmarks/results/<gpu>)"
    )
    return parser.parse_args(argv)


def vllm_fused_experts(activation: str):
    """vLLM's BF16 Triton MoE as f(x, w13, w2, topk_weights, topk_ids), or a string saying why not."""
    try:
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except Exception as exc:  # any import failure means "not available here", reported in the table
        return f"vLLM fused_experts not importable ({type(exc).__name__})"
    act = MoEActivation(activation)
    return lambda x, w13, w2, tw, ids: fused_experts(x, w13, w2, tw, ids, activation=act)


def bench_moe(args: argparse.Namespace, device: str = "cuda") -> list[bench.BenchRow]:
    """Check, then time, every provider at each M."""
    from nvfp4_ext.kernels import nvfp4_moe, nvfp4_moe_ref
    from nvfp4_ext.kernels.nvfp4_words import pack_nvfp4_weights

    from nvfp4_ext.format import dequantize_nvfp4, quantize_nvfp4

    dtype, experts, hidden, inter, top_k = (
        DTYPES[args.dtype],
        args.experts,
        args.hidden,
        args.inter,
        args.top_k,
    )
    q13 = quantize_nvfp4(torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5)
    q2 = quantize_nvfp4(torch.randn(experts, hidden, inter, device=device) / inter**0.5)
    w13_dense, w2_dense = q13.dequantize(dtype), q2.dequantize(dtype)
    fused = vllm_fused_experts(args.activation) if device == "cuda" else "vLLM's Triton MoE needs CUDA"
    weights = (q13.qdata, q13.scale, q13.global_scale, q2.qdata, q2.scale, q2.global_scale)

    def dequant_first(x, tw, ids):
        w13 = dequantize_nvfp4(q13.qdata, q13.scale, q13.global_scale, dtype=dtype)
        w2 = dequantize_nvfp4(q2.qdata, q2.scale, q2.global_scale, dtype=dtype)
        return fused(x, w13, w2, tw, ids)

    providers = {}
    if callable(fused):
        providers["bf16-triton"] = lambda x, tw, ids: fused(x, w13_dense, w2_dense, tw, ids)
        providers["dequant-first"] = dequant_first
    # Packed once, as the engine adapters do at load (the launcher would repack checkpoint bytes per call).
    w13_words, w13_codes = pack_nvfp4_weights(q13.qdata, q13.scale, "w13")
    w2_words, w2_codes = pack_nvfp4_weights(q2.qdata, q2.scale, "w2")
    packed = (w13_words, w13_codes, q13.global_scale, w2_words, w2_codes, q2.global_scale)
    providers["nvfp4-triton"] = lambda x, tw, ids: nvfp4_moe(
        x, *packed, tw, ids, args.activation, backend="triton"
    )
    if device == "cuda" and dtype == torch.bfloat16:
        providers["nvfp4-triton-portable"] = bench.with_portable_decode(providers["nvfp4-triton"])
    providers["torch-ref"] = lambda x, tw, ids: nvfp4_moe_ref(x, *weights, tw, ids, args.activation)

    name = f"E={experts} H={hidden} I={inter} top{top_k}"
    bytes_per_expert = 3 * inter * hidden  # w13 + w2 elements
    rows = []
    for m in args.m:
        x = torch.randn(m, hidden, device=device, dtype=dtype)
        logits = torch.randn(m, experts, device=device)
        topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        topk_ids = topk_ids.to(torch.int32)
        expected = nvfp4_moe_ref(x, *weights, topk_weights, topk_ids, args.activation)
        active = int(torch.unique(topk_ids).numel())
        baseline = None
        if not callable(fused):
            rows.append(bench.BenchRow(shape=name, m=m, provider="bf16-triton", note=fused))
        for provider, fn in providers.items():
            row = bench.BenchRow(shape=name, m=m, provider=provider)
            try:
                row.rel_error = bench.relative_error(fn(x, topk_weights, topk_ids), expected)
                timed = bench.time_us(
                    lambda fn=fn, args=(x, topk_weights, topk_ids): fn(*args), cuda=device == "cuda"
                )
            except Exception as exc:  # a failing provider is reported, not fatal to the sweep
                row.note = f"failed: {exc}"
                rows.append(row)
                continue
            row.median_us, row.p20_us, row.p80_us = timed
            weight_bytes = active * bytes_per_expert * (2 if provider == "bf16-triton" else 9 / 16)
            row.gbps = weight_bytes / (row.median_us * 1e-6) / 1e9
            row.tflops = 2 * m * top_k * bytes_per_expert / (row.median_us * 1e-6) / 1e12
            baseline = baseline or row.median_us
            row.speedup = baseline / row.median_us
            row.note = f"{active} experts active"
            rows.append(row)
    return rows


def print_table(rows: list[bench.BenchRow]) -> None:
    print(
        "| shape | M | provider | median us | p20-p80 us | weight GB/s | speedup vs baseline | time ratio "
        "| rel err | note |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r.median_us is None:
            print(f"| {r.shape} | {r.m} | {r.provider} | | | | | | | {r.note} |")
            continue
        print(
            f"| {r.shape} | {r.m} | {r.provider} | {r.median_us:.1f} | {r.p20_us:.1f}-{r.p80_us:.1f} | "
            f"{r.gbps:.0f} | {r.speedup:.2f}x | {1 / r.speedup:.2f} | {r.rel_error:.1e} | {r.note} |"
        )


def cpu_smoke(args: argparse.Namespace) -> int:
    """The benchmark's own code path on a tiny MoE through the interpreter: correctness, no timing."""
    print(bench.cpu_smoke_banner("bench_moe"))
    tiny = argparse.Namespace(
        **{
            **vars(args),
            "m": [1, 16, 33],
            "experts": 8,
            "hidden": 64,
            "inter": 32,
            "top_k": 2,
            "dtype": "fp16",
        }
    )
    rows = bench_moe(tiny, device="cpu")
    print_table(rows)
    failed = [
        r for r in rows if r.note.startswith("failed") or (r.rel_error is not None and r.rel_error > 1e-2)
    ]
    print("smoke: " + ("FAILED" if failed else "ok (CPU times above are interpreter times, not performance)"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bench.set_interpreter_for_cpu():
        return cpu_smoke(args)
    torch.manual_seed(args.seed)
    env = bench.environment(vars(args) | {"out": str(args.out) if args.out else None})
    print(
        f"Run environment: {env['gpu']} (sm_{''.join(map(str, env['capability']))}), torch {env['torch']}, "
        f"triton {env['triton']}, vllm {env['vllm']}, git {env['git_sha']}"
    )
    rows = bench_moe(args)
    print_table(rows)
    path = bench.write_results("moe", rows, env, args.out)
    baseline = rows[0].provider if rows else ""
    plot = bench.plot_speedups(
        [r for r in rows if r.provider != baseline], "NVFP4 MoE vs BF16 Triton MoE", path.with_suffix(".png")
    )
    print(f"wrote {path}" + (f" and {plot}" if plot else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
