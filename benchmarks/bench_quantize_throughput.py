"""Quantizer throughput (MB/s of input) and peak RSS on a synthetic multi-GB BF16 MoE checkpoint, beside
ModelOpt's `NVFP4QTensor.quantize` on the same tensors in the same run.

Builds a Gemma-4-shaped checkpoint (fused experts [E, 2I, H] / [E, H, I], attention and dense-MLP
linears, an embedding) of about --size-gb GB in --shard-gb shards under a temporary directory, then runs
`quantize_checkpoint` in a child process and reports wall time, MB/s and the child's peak RSS against the
goals (>= 4x ModelOpt; peak RSS <= 2x the largest input shard). A second child then quantizes every
weight our run quantized (the same 2-D pieces: experts unfused) with ModelOpt, times only those calls
(no I/O, so ModelOpt's figure is favourable to it), checks our output bytes are identical, and prints
the ratios: wall, wall of our whole process (Python start and imports included), and per CPU-second,
with the load average beside them (the machine may be shared). Nothing is kept unless --keep; --src
quantizes an existing checkpoint instead of building one.

    python benchmarks/bench_quantize_throughput.py [--size-gb 3] [--shard-gb 1] [--scales rtn]
        [--modelopt-threads N] [--src DIR] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

# DiffusionGemma-26B shapes with fewer experts per layer, so a few GB hold several layers.
HIDDEN, MOE_INTER, DENSE_INTER, HEADS_DIM, KV_DIM = 2816, 704, 2112, 16 * 256, 8 * 256

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from nvfp4_ext.quantize import quantize_checkpoint
    start = time.perf_counter()
    quantize_checkpoint(sys.argv[1], sys.argv[2], recipe="w4a16", scales=sys.argv[3], progress=False)
    seconds = time.perf_counter() - start
    # VmHWM is this process image's peak RSS; getrusage's ru_maxrss would include the forked parent's pages.
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()
    print(json.dumps({"seconds": seconds, "peak_rss_kb": int(status[0])}))
    """
)


_MODELOPT_CHILD = textwrap.dedent(
    """
    import json, sys, time, warnings
    import torch
    warnings.filterwarnings("ignore")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors import safe_open
    from nvfp4_ext.quantize.io import list_source_tensors, read_tensor
    from nvfp4_ext.quantize.plan import plan_tasks
    src, dst = sys.argv[1], sys.argv[2]
    index = json.load(open(f"{dst}/model.safetensors.index.json"))["weight_map"]
    handles = {}
    def ours(name):
        shard = index[name]
        if shard not in handles:
            handles[shard] = safe_open(f"{dst}/{shard}", "pt")
        return handles[shard].get_tensor(name)
    tasks = plan_tasks(list_source_tensors(__import__("pathlib").Path(src)), recipe="w4a16", calibrated=False)
    seconds, cpu_seconds, nbytes, compared = 0.0, 0.0, 0, 0
    torch.set_num_threads(int(sys.argv[3]))
    for task in tasks:
        if task.action == "copy":
            continue
        w = read_tensor(task.source)
        if task.action == "linear":
            pieces = [(task.modules[0], w)]
        else:
            split = task.fused
            rows = w.shape[1] // len(split.projections)
            pieces = [(split.module(e, p), w[e, i * rows:(i + 1) * rows].contiguous())
                      for e in range(split.num_experts) for i, p in enumerate(split.projections)]
        for module, piece in pieces:
            start, cpu_start = time.perf_counter(), time.process_time()
            qtensor, scale, _ = NVFP4QTensor.quantize(piece, 16)
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu_start
            nbytes += piece.numel() * piece.element_size()
            if not torch.equal(qtensor._quantized_data, ours(f"{module}.weight")) or not torch.equal(
                    scale.view(torch.uint8), ours(f"{module}.weight_scale").view(torch.uint8)):
                raise SystemExit(f"output differs from ModelOpt at {module}")
            compared += 1
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "bytes": nbytes, "compared": compared}))
    """
)


def _layer(i: int, experts: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}"
    return {
        f"{p}.self_attn.q_proj.weight": (HEADS_DIM, HIDDEN),
        f"{p}.self_attn.k_proj.weight": (KV_DIM, HIDDEN),
        f"{p}.self_attn.v_proj.weight": (KV_DIM, HIDDEN),
        f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS_DIM),
        f"{p}.mlp.gate_proj.weight": (DENSE_INTER, HIDDEN),
        f"{p}.mlp.up_proj.weight": (DENSE_INTER, HIDDEN),
        f"{p}.mlp.down_proj.weight": (HIDDEN, DENSE_INTER),
        f"{p}.router.proj.weight": (experts, HIDDEN),
        f"{p}.experts.gate_up_proj": (experts, 2 * MOE_INTER, HIDDEN),
        f"{p}.experts.down_proj": (experts, HIDDEN, MOE_INTER),
        f"{p}.input_layernorm.weight": (HIDDEN,),
    }


def build(root: Path, size_gb: float, shard_gb: float, experts: int = 32) -> tuple[int, int]:
    """Write the synthetic checkpoint; returns (total bytes, largest shard bytes)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["Synthetic"], "model_type": "synthetic"}))
    shapes = {"model.embed_tokens.weight": (32768, HIDDEN)}
    layer = 0
    while sum(torch.Size(s).numel() for s in shapes.values()) * 2 < size_gb * 1e9:
        shapes.update(_layer(layer, experts))
        layer += 1
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    sizes, weight_map = [], {}

    def flush() -> None:
        name = f"model-{len(sizes) + 1:05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        sizes.append(sum(t.numel() * 2 for t in shard.values()))
        weight_map.update({k: name for k in shard})
        shard.clear()

    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.bfloat16) * 0.02
        if shard and (sum(t.numel() * 2 for t in shard.values()) + tensor.numel() * 2) > shard_gb * 1e9:
            flush()
        shard[name] = tensor
    flush()
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--scales", default="rtn", choices=("rtn", "four-over-six", "mse"))
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--src",
        type=Path,
        help="quantize this checkpoint (e.g. one an earlier --keep run built) instead of building one",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--modelopt-threads",
        type=int,
        default=0,
        help="torch intra-op threads for ModelOpt (default: the usable CPUs; 1 is its best case on a loaded "
        "machine, where its spinning threads collapse)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nvfp4_bench_", dir=args.workdir))
    try:
        start = time.perf_counter()
        if args.src is not None:
            (work / "src").symlink_to(args.src.absolute())
            sizes = [p.stat().st_size for p in args.src.glob("*.safetensors")]
            total, largest = sum(sizes), max(sizes)
        else:
            total, largest = build(work / "src", args.size_gb, args.shard_gb)
        print(
            f"{'reused' if args.src else 'built'} {total / 1e9:.2f} GB in "
            f"{time.perf_counter() - start:.1f} s (largest shard {largest / 1e9:.2f} GB)"
        )
        load_before = os.getloadavg()
        process_start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(work / "src"), str(work / "dst"), args.scales],
            check=True,
            capture_output=True,
            text=True,
        )
        process_seconds = time.perf_counter() - process_start
        report = json.loads(child.stdout.strip().splitlines()[-1])
        seconds, peak_rss = report["seconds"], report["peak_rss_kb"] * 1024
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = usage.ru_utime + usage.ru_stime
        out_bytes = sum(p.stat().st_size for p in (work / "dst").glob("*.safetensors"))
        result = {
            "input_bytes": total,
            "output_bytes": out_bytes,
            "largest_input_shard": largest,
            "scales": args.scales,
            "seconds": seconds,
            "mb_per_s": total / 1e6 / seconds,
            "process_seconds": process_seconds,
            "process_mb_per_s": total / 1e6 / process_seconds,
            "cpu_seconds": cpu_seconds,
            "mb_per_cpu_second": total / 1e6 / cpu_seconds,
            "peak_rss_bytes": peak_rss,
            "rss_over_largest_shard": peak_rss / largest,
        }
        print(
            f"quantize ({args.scales}): {seconds:.1f} s, {result['mb_per_s']:.0f} MB/s of input, "
            f"output {out_bytes / 1e9:.2f} GB; the whole child process (Python start and imports included) "
            f"{process_seconds:.1f} s = {result['process_mb_per_s']:.0f} MB/s"
        )
        print(
            f"CPU time {cpu_seconds:.1f} s (child, incl. imports): {result['mb_per_cpu_second']:.0f} MB per "
            "CPU-second; on a shared machine wall-clock MB/s understates what 2 idle cores do"
        )
        print(
            f"peak RSS {peak_rss / 1e9:.2f} GB = {result['rss_over_largest_shard']:.2f}x "
            "the largest input shard "
            "(goal <= 2x)"
        )
        load_ours = os.getloadavg()
        modelopt_threads = args.modelopt_threads or len(os.sched_getaffinity(0))
        modelopt_args = [str(work / "src"), str(work / "dst"), str(modelopt_threads)]
        modelopt = subprocess.run(
            [sys.executable, "-c", _MODELOPT_CHILD, *modelopt_args],
            check=True,
            capture_output=True,
            text=True,
        )
        load_modelopt = os.getloadavg()
        baseline = json.loads(modelopt.stdout.strip().splitlines()[-1])
        modelopt_mb_s = baseline["bytes"] / 1e6 / baseline["seconds"]
        modelopt_mb_cpu_s = baseline["bytes"] / 1e6 / baseline["cpu_seconds"]
        result.update(
            {
                "modelopt_threads": modelopt_threads,
                "modelopt_quantize_seconds": baseline["seconds"],
                "modelopt_quantize_cpu_seconds": baseline["cpu_seconds"],
                "modelopt_mb_per_s": modelopt_mb_s,
                "modelopt_mb_per_cpu_second": modelopt_mb_cpu_s,
                "modelopt_tensors_byte_identical": baseline["compared"],
                "ratio_to_modelopt": result["mb_per_s"] / modelopt_mb_s,
                "cpu_ratio_to_modelopt": result["mb_per_cpu_second"] / modelopt_mb_cpu_s,
                "process_ratio_to_modelopt": result["process_mb_per_s"] / modelopt_mb_s,
                "load_average_1min": {
                    "start": load_before[0],
                    "after_ours": load_ours[0],
                    "after_modelopt": load_modelopt[0],
                },
            }
        )
        print(
            f"ModelOpt NVFP4QTensor.quantize on the same {baseline['compared']} weights: "
            f"{baseline['seconds']:.1f} s of quantize calls, {modelopt_mb_s:.0f} MB/s with {modelopt_threads} "
            f"intra-op thread(s); ours (quantize_checkpoint, with I/O) {result['mb_per_s']:.0f} MB/s = "
            f"{result['ratio_to_modelopt']:.2f}x ModelOpt (goal >= 4x); with Python start and imports "
            f"{result['process_ratio_to_modelopt']:.2f}x; outputs byte-identical"
        )
        print(
            f"per CPU-second (robust to a loaded machine): ours {result['mb_per_cpu_second']:.0f} MB (whole "
            f"process, incl. imports and I/O), ModelOpt {modelopt_mb_cpu_s:.0f} MB (quantize calls only) "
            f"= {result['cpu_ratio_to_modelopt']:.2f}x"
        )
        print(
            f"1-min load average (this machine is shared): {load_before[0]:.2f} at start, {load_ours[0]:.2f} "
            f"after ours, {load_modelopt[0]:.2f} after ModelOpt"
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
