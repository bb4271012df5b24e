"""A static performance model of the NVFP4 kernels (`nvfp4-ext kernels-report --predict`), no GPU needed.

For one GEMM (or one fused MoE) the predicted time is the largest of three bounds, plus a launch cost:

* **DRAM**: bytes moved / achieved bandwidth. Bytes: packed weights and block scales (0.5625 B per weight;
  BF16: 2 B), activations in and outputs out (split-K partials as fp32 atomics). Achieved bandwidth is the
  smaller of `DRAM_EFFICIENCY` x the published peak and what the resident programs keep in flight
  (Little's law: active SMs x CTAs per SM x bytes per CTA in flight / `DRAM_LATENCY_NS`; a CTA of a
  cp.async pipeline of S stages has S - 1 weight tiles in flight).
* **Issue**: weights x K-loop SASS lane-instructions per weight (counted by `sass.py` in the compiled
  cubin) / (active SMs x 128 lane-instructions per clock x boost clock x `ISSUE_EFFICIENCY`).
* **Tensor cores**: 2 x max(M, 16) x N x K / (`MMA_EFFICIENCY` x published dense BF16 peak).

BF16 baseline: the same three bounds with 2-byte weights, no decode instructions and cuBLAS-like issue
(the instructions of a BF16 GEMM are loads and MMAs: `BF16_SASS_PER_WEIGHT`). MoE: routed experts only,
the expected number of distinct experts for M tokens under uniform top-k routing.

Stated assumptions (constants below): boost clocks, 85 % of peak DRAM bandwidth, 80 % of the issue rate,
60 % of tensor-core peak, 700 ns DRAM latency under load, 3 us per kernel launch inside a CUDA graph.
They are checked against public anchors in `tests/test_kernels_roofline.py`: Marlin's INT4 W4A16 GEMM
reaching ~3.87x BF16 at batch <= 16 (IST-DASLab/marlin), and vLLM's BF16 Triton MoE for the Gemma 4
shape on H200 at M=1 (185 us, vLLM PR #44818), which the model can only bound from below (see docs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "GPUS",
    "MARLIN_INT4_BYTES_PER_WEIGHT",
    "MARLIN_SASS_PER_WEIGHT",
    "NVFP4_BYTES_PER_WEIGHT",
    "PredictedRow",
    "Gpu",
    "KernelResources",
    "Prediction",
    "bf16_gemm_time_us",
    "bf16_moe_time_us",
    "distinct_experts",
    "format_predictions",
    "nvfp4_gemm_time_us",
    "nvfp4_moe_time_us",
    "predict_diffusiongemma",
    "resources_from_label",
]

DRAM_EFFICIENCY = 0.85
ISSUE_EFFICIENCY = 0.8
MMA_EFFICIENCY = 0.6
DRAM_LATENCY_NS = 700.0
LAUNCH_US = 3.0
LANES_PER_SM_CLOCK = 128  # 4 schedulers x 1 warp instruction x 32 lanes
BF16_SASS_PER_WEIGHT = 0.5  # a BF16 GEMM issues loads and MMAs only (assumed)
# Marlin INT4 g128 (the anchor): 0.5 B + 2 B per 128 weights; ~2 lane-instructions per weight (assumed: two
# lop3 + one hfma2 per pair of weights, the MMA and loads amortized over its pre-shuffled tiles).
MARLIN_INT4_BYTES_PER_WEIGHT = 0.5 + 2 / 128
MARLIN_SASS_PER_WEIGHT = 2.0
NVFP4_BYTES_PER_WEIGHT = 0.5625  # 4-bit code + one e4m3 byte per 16


@dataclass(frozen=True)
class Gpu:
    """Published figures of one GPU (vendor datasheets): SMs, boost clock, DRAM bandwidth, dense BF16
    tensor-core peak with fp32 accumulation; the capability selects the compiled SASS."""

    name: str
    capability: int
    sms: int
    boost_ghz: float
    dram_tb_s: float
    bf16_tflops: float


GPUS: dict[str, Gpu] = {
    "H100": Gpu("H100 SXM5", 90, 132, 1.98, 3.35, 989.0),
    "H200": Gpu("H200 SXM", 90, 132, 1.98, 4.8, 989.0),
    "L40S": Gpu("L40S", 89, 142, 2.52, 0.864, 362.0),
    "RTX5090": Gpu("RTX 5090", 120, 170, 2.41, 1.792, 209.5),
}


@dataclass(frozen=True)
class KernelResources:
    """What the model needs of one compiled tile (from `report.compile_variant`)."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    sass_per_weight: float
    ctas_per_sm: int


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one call and the bound that decided it."""

    time_us: float
    bound: str  # "dram" | "issue" | "mma"


def _bounded(dram_us: float, issue_us: float, mma_us: float, launches: int = 1) -> Prediction:
    bounds = {"dram": dram_us, "issue": issue_us, "mma": mma_us}
    bound = max(bounds, key=bounds.get)
    return Prediction(bounds[bound] + launches * LAUNCH_US, bound)


def _achieved_bandwidth(
    gpu: Gpu, programs: int, res: KernelResources, bytes_per_weight: float, rows_per_tile: int = 0
) -> float:
    """Bytes/us the resident programs sustain: peak x efficiency, or Little's law if fewer in flight."""
    active_sms = min(gpu.sms, programs)
    ctas = max(1, min(res.ctas_per_sm, math.ceil(programs / gpu.sms)))
    rows = rows_per_tile or res.block_n
    in_flight = max(1, res.num_stages - 1) * rows * res.block_k * bytes_per_weight
    littles_law = active_sms * ctas * in_flight / (DRAM_LATENCY_NS * 1e-3)
    return min(gpu.dram_tb_s * 1e6 * DRAM_EFFICIENCY, littles_law)


def _issue_us(gpu: Gpu, weights: float, sass_per_weight: float, programs: int) -> float:
    lanes_per_us = min(gpu.sms, programs) * LANES_PER_SM_CLOCK * gpu.boost_ghz * 1e3 * ISSUE_EFFICIENCY
    return weights * sass_per_weight / lanes_per_us


def _mma_us(gpu: Gpu, m: int, n: int, k: int) -> float:
    return 2.0 * max(m, 16) * n * k / (gpu.bf16_tflops * 1e6 * MMA_EFFICIENCY)


def nvfp4_gemm_time_us(
    gpu: Gpu, m: int, n: int, k: int, res: KernelResources, split_k: int = 1,
    bytes_per_weight: float = NVFP4_BYTES_PER_WEIGHT,
) -> Prediction:
    """One weight-only 4-bit GEMM [M, K] x [N, K]^T with the given compiled tile (NVFP4 by default)."""
    m_blocks = math.ceil(m / res.block_m)
    programs = m_blocks * math.ceil(n / res.block_n) * split_k
    out_bytes = m * n * (4 * split_k if split_k > 1 else 2)
    # Weights leave DRAM once (the M-blocks re-read them from L2) but are decoded once per M-block.
    total = n * k * bytes_per_weight + m * k * 2 + out_bytes
    dram = total / _achieved_bandwidth(gpu, programs, res, bytes_per_weight)
    issue = _issue_us(gpu, n * k * m_blocks, res.sass_per_weight, programs)
    return _bounded(dram, issue, _mma_us(gpu, m, n, k), launches=2 if split_k > 1 else 1)


def bf16_gemm_time_us(gpu: Gpu, m: int, n: int, k: int) -> Prediction:
    """cuBLAS-like BF16 GEMM: weights read once, MMAs at `MMA_EFFICIENCY` of peak."""
    total = n * k * 2 + m * k * 2 + m * n * 2
    dram = total / (gpu.dram_tb_s * 1e6 * DRAM_EFFICIENCY)
    issue = _issue_us(gpu, n * k, BF16_SASS_PER_WEIGHT, gpu.sms)
    return _bounded(dram, issue, _mma_us(gpu, m, n, k))


def distinct_experts(tokens: int, experts: int, top_k: int) -> float:
    """Expected number of experts hit by `tokens` tokens routed uniformly to top_k of `experts`."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def nvfp4_moe_time_us(
    gpu: Gpu, tokens: int, experts: int, hidden: int, inter: int, top_k: int,
    gate_up: KernelResources, down: KernelResources,
) -> Prediction:
    """Both grouped GEMMs of the fused NVFP4 MoE (plus the alignment kernel's launch)."""
    hit = distinct_experts(tokens, experts, top_k)
    pairs = tokens * top_k
    blocks = hit * max(1, math.ceil(pairs / hit / gate_up.block_m))  # M-blocks actually launched
    total_us = LAUNCH_US  # moe_align_block_size
    worst = "dram"
    stages = (
        (gate_up, 2 * inter, hidden, 2 * inter * hidden),  # gate and up rows side by side
        (down, hidden, inter, hidden * inter),
    )
    for res, n_out, k, weights_per_expert in stages:
        rows = 2 * res.block_n if res is gate_up else res.block_n
        programs = int(blocks * math.ceil(n_out / rows))
        weights = weights_per_expert * blocks  # decoded once per M-block; from DRAM once per expert
        total = weights_per_expert * hit * NVFP4_BYTES_PER_WEIGHT + pairs * (k + n_out) * 2
        dram = total / _achieved_bandwidth(gpu, programs, res, NVFP4_BYTES_PER_WEIGHT, rows)
        issue = _issue_us(gpu, weights, res.sass_per_weight, programs)
        mma = 2.0 * blocks * res.block_m * n_out * k / (gpu.bf16_tflops * 1e6 * MMA_EFFICIENCY)
        prediction = _bounded(dram, issue, mma)
        total_us += prediction.time_us
        if prediction.bound != "dram":
            worst = prediction.bound
    return Prediction(total_us, worst)


def bf16_moe_time_us(
    gpu: Gpu, tokens: int, experts: int, hidden: int, inter: int, top_k: int,
    block_m: int = 16, block_n: int = 64, block_k: int = 64, num_stages: int = 3, ctas_per_sm: int = 4,
) -> Prediction:
    """vLLM's BF16 Triton fused MoE (two grouped GEMMs + alignment) with a small-M tile: routed experts'
    BF16 weights, the same Little's-law bandwidth bound as ours."""
    hit = distinct_experts(tokens, experts, top_k)
    pairs = tokens * top_k
    blocks = hit * max(1, math.ceil(pairs / hit / block_m))
    res = KernelResources(block_m, block_n, block_k, num_stages, BF16_SASS_PER_WEIGHT, ctas_per_sm)
    total_us = LAUNCH_US
    for n_out, k in ((2 * inter, hidden), (hidden, inter)):
        programs = int(blocks * math.ceil(n_out / block_n))
        weights = n_out * k * blocks
        total = n_out * k * hit * 2 + pairs * (k + n_out) * 2
        dram = total / _achieved_bandwidth(gpu, programs, res, 2.0)
        issue = _issue_us(gpu, weights, BF16_SASS_PER_WEIGHT, programs)
        mma = 2.0 * blocks * block_m * n_out * k / (gpu.bf16_tflops * 1e6 * MMA_EFFICIENCY)
        total_us += _bounded(dram, issue, mma).time_us
    return Prediction(total_us, "dram")


# -------------------------------------------------------------------------------- DiffusionGemma table
@dataclass(frozen=True)
class PredictedRow:
    """One (GPU, layer, M) line of `nvfp4-ext kernels-report --predict`."""

    gpu: str
    layer: str
    m: int
    nvfp4_us: float
    bound: str
    bf16_us: float

    @property
    def speedup(self) -> float:
        return self.bf16_us / self.nvfp4_us


def resources_from_label(config: str, sass_per_weight: float, ctas_per_sm: int) -> KernelResources:
    """KernelResources of a report row (config label "BMxBNxBK wW sS ...")."""
    found = re.match(r"(\d+)x(\d+)x(\d+) w(\d+) s(\d+)", config)
    if not found:
        raise ValueError(f"expected a config label like '16x64x128 w4 s4', got {config!r}")
    block_m, block_n, block_k, _, stages = (int(g) for g in found.groups())
    return KernelResources(block_m, block_n, block_k, stages, sass_per_weight, ctas_per_sm)


def predict_diffusiongemma(
    resources: dict[tuple[str, str, int], KernelResources],
    gpus: tuple[str, ...] = tuple(GPUS),
    batch_sizes: tuple[int, ...] = (1, 16, 256),
) -> list[PredictedRow]:
    """Predicted NVFP4 and BF16 times for every DiffusionGemma layer shape, M and GPU.

    `resources[(kernel, used_by, capability)]` holds the compiled tile of each shipped row (`used_by` as in
    `KernelVariant.used_by`, e.g. "mlp_down N=2816 K=2112 M=16"); `report.predict` fills it.
    """
    from .nvfp4_gemm_kernel import DIFFUSIONGEMMA_GEMM_SHAPES, select_gemm_config
    from .shapes import DIFFUSIONGEMMA_MOE_SHAPE

    rows = []
    moe = DIFFUSIONGEMMA_MOE_SHAPE
    moe_name = f"experts E={moe['num_experts']} H={moe['hidden']} I={moe['intermediate']} top{moe['top_k']}"
    for key in gpus:
        gpu = GPUS[key]
        for name, n, k in DIFFUSIONGEMMA_GEMM_SHAPES:
            for m in batch_sizes:
                res = resources[("nvfp4_gemm", f"{name} N={n} K={k} M={m}", gpu.capability)]
                split = select_gemm_config(m, n, k).split_k
                ours = nvfp4_gemm_time_us(gpu, m, n, k, res, split_k=split)
                bf16 = bf16_gemm_time_us(gpu, m, n, k).time_us
                rows.append(PredictedRow(key, name, m, ours.time_us, ours.bound, bf16))
        for m in batch_sizes:
            gate_up = resources[("nvfp4_moe_gate_up", f"{moe_name} M={m}", gpu.capability)]
            down = resources[("nvfp4_moe_down", f"{moe_name} M={m}", gpu.capability)]
            args = (gpu, m, moe["num_experts"], moe["hidden"], moe["intermediate"], moe["top_k"])
            ours = nvfp4_moe_time_us(*args, gate_up, down)
            bf16 = bf16_moe_time_us(*args).time_us
            rows.append(PredictedRow(key, "moe (both GEMMs)", m, ours.time_us, ours.bound, bf16))
    return rows


def format_predictions(rows: list[PredictedRow]) -> str:
    """A markdown table of the predictions, one row per (GPU, layer, M)."""
    lines = [
        "| GPU | layer | M | NVFP4 (us) | bound | BF16 (us) | BF16 / NVFP4 |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.gpu} | {r.layer} | {r.m} | {r.nvfp4_us:.1f} | {r.bound} | {r.bf16_us:.1f} "
            f"| {r.speedup:.2f}x |"
        )
    return "\n".join(lines)
