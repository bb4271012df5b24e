"""`quantize_checkpoint`: stream a BF16/FP16/FP32 safetensors checkpoint into an NVFP4 (or mixed) checkpoint.

One input tensor is read, quantized and written at a time into pre-planned output shards (see
`nvfp4_ext.quantize.io`), inside a temporary directory that is renamed to the destination only when
everything, configs included, has been written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvfp4_ext.errors import CheckpointError, ConfigError, Nvfp4ExtError
from nvfp4_ext.format import F8E4M3_MAX, NVFP4_GLOBAL_DENOM, dequantize_fp8, quantize_fp8, stored_global_scale
from nvfp4_ext.quantize.export_config import compressed_tensors_config, modelopt_configs
from nvfp4_ext.quantize.io import (
    OutputTensor,
    ShardWriter,
    SourceTensor,
    atomic_output_dir,
    check_output_dir,
    copy_aux_files,
    list_source_tensors,
    map_tensor,
    write_index,
)
from nvfp4_ext.quantize.plan import TensorTask, plan_tasks
from nvfp4_ext.quantize.scales import SCALE_METHODS, NonFiniteWeightError, ScaleStats, quantize_weight

__all__ = ["PROVENANCE_FILE", "QuantizeResult", "quantize_checkpoint"]

log = logging.getLogger(__name__)

PROVENANCE_FILE = "nvfp4_ext_quantize.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


@dataclass
class QuantizeResult:
    """Per-tensor error bookkeeping of one run (written into the provenance file)."""

    layers: list[dict] = field(default_factory=list)
    total: ScaleStats = field(default_factory=ScaleStats)


@dataclass
class _Run:
    """Options and state shared by every tensor of one run."""

    method: str
    fmt: str
    amax: dict[str, float]
    executor: Executor | None
    result: QuantizeResult


def _reject_quantized(src: Path, config: dict, tensors: Sequence[SourceTensor]) -> None:
    q = config.get("quantization_config")
    if isinstance(q, dict):
        method = q.get("quant_method", "?")
        algo = q.get("quant_algo") or q.get("format") or ""
        raise CheckpointError(
            f"the input is already quantized (quant_method {method!r}{f', {algo}' if algo else ''}); "
            "quantize the original BF16/FP16/FP32 checkpoint instead",
            file=str(src / "config.json"),
        )
    if (src / "hf_quant_config.json").is_file():
        raise CheckpointError(
            "the input is already quantized (ModelOpt hf_quant_config.json present); quantize the original "
            "BF16/FP16/FP32 checkpoint instead",
            file=str(src / "hf_quant_config.json"),
        )
    for tensor in tensors:
        if tensor.dtype in ("U8", "F8_E4M3", "F8_E5M2") and tensor.name.endswith(
            (".weight", ".weight_packed")
        ):
            raise CheckpointError(
                f"the input looks already quantized ({tensor.dtype} weight); "
                "quantize the original checkpoint",
                file=tensor.file.name,
                tensor=tensor.name,
            )


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(
            "config.json not found (expected a Hugging Face model directory)", file=str(src)
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable config.json: {exc}", file=str(path)) from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", file=str(path))
    return config


def _shard_plan(tasks: list[TensorTask], max_bytes: int) -> list[list[TensorTask]]:
    shards: list[list[TensorTask]] = [[]]
    size = 0
    for task in tasks:
        task_bytes = sum(o.nbytes for o in task.outputs)
        if shards[-1] and size + task_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(task)
        size += task_bytes
    return shards


def _input_scale(amax: dict[str, float], module: str, denom: float) -> torch.Tensor:
    if module not in amax or amax[module] <= 0:
        raise ConfigError(
            f"--calib: no activations reached module {module} during calibration; use a longer or more "
            "varied calibration text, or --recipe w4a16"
        )
    return torch.tensor(amax[module] / denom, dtype=torch.float32)


def _nvfp4_tensors(
    module: str, w: torch.Tensor, task: TensorTask, run: _Run, stats: ScaleStats
) -> list[tuple[str, torch.Tensor]]:
    q = quantize_weight(w, run.method, stats=stats, executor=run.executor)  # type: ignore[arg-type]
    amax = run.amax
    if run.fmt == "modelopt":
        out = [
            (f"{module}.weight", q.qdata),
            (f"{module}.weight_scale", q.scale),
            (f"{module}.weight_scale_2", q.global_scale),
        ]
        if task.scheme == "nvfp4":
            out.append((f"{module}.input_scale", _input_scale(amax, module, NVFP4_GLOBAL_DENOM)))
        return out
    convention = "compressed_tensors"
    out = [
        (f"{module}.weight_packed", q.qdata),
        (f"{module}.weight_scale", q.scale),
        (f"{module}.weight_global_scale", stored_global_scale(q.global_scale, convention).reshape(1)),
    ]
    if task.scheme == "nvfp4":
        multiplier = _input_scale(amax, module, NVFP4_GLOBAL_DENOM)
        out.append((f"{module}.input_global_scale", stored_global_scale(multiplier, convention).reshape(1)))
    return out


def _fp8_tensors(
    module: str, w: torch.Tensor, task: TensorTask, amax: dict[str, float]
) -> list[tuple[str, torch.Tensor]]:
    if task.scheme == "fp8":
        q, scale = quantize_fp8(w, "tensor")
        return [
            (f"{module}.weight", q),
            (f"{module}.weight_scale", scale.reshape(())),
            (f"{module}.input_scale", _input_scale(amax, module, F8E4M3_MAX)),
        ]
    q, scale = quantize_fp8(w, "block")
    return [(f"{module}.weight", q), (f"{module}.weight_scale", scale)]


def _fp8_with_stats(
    module: str, w: torch.Tensor, task: TensorTask, amax: dict[str, float], stats: ScaleStats
) -> list[tuple[str, torch.Tensor]]:
    # NVFP4 finds NaN/Inf in its block maxima without an extra pass; FP8 checks here.
    if not torch.isfinite(w.abs().amax()):
        raise NonFiniteWeightError(f"{module} has NaN or Inf values")
    fp8 = _fp8_tensors(module, w, task, amax)
    w = w.float()
    sse = float((dequantize_fp8(fp8[0][1], fp8[1][1]) - w).square().sum())
    stats.add(ScaleStats(sse, sse, float(w.square().sum()), 0, 0))
    return fp8


def _process(task: TensorTask, w: torch.Tensor, run: _Run) -> list[tuple[str, torch.Tensor]]:
    if task.action == "copy":
        return [(task.source.name, w)]
    stats = ScaleStats()
    outputs: list[tuple[str, torch.Tensor]] = []
    if task.action == "linear":
        pieces = [(task.modules[0], w)]
    else:
        split = task.fused
        assert split is not None
        rows = w.shape[1] // len(split.projections)
        pieces = [
            (split.module(e, proj), w[e, i * rows : (i + 1) * rows])
            for e in range(split.num_experts)
            for i, proj in enumerate(split.projections)
        ]
    for module, piece in pieces:
        try:
            if task.scheme.startswith("nvfp4"):
                outputs += _nvfp4_tensors(module, piece, task, run, stats)
            else:
                outputs += _fp8_with_stats(module, piece, task, run.amax, stats)
        except NonFiniteWeightError:
            raise CheckpointError(
                f"weight has NaN or Inf values (module {module})",
                file=task.source.file.name,
                tensor=task.source.name,
            ) from None
    run.result.total.add(stats)
    run.result.layers.append(
        {
            "tensor": task.source.name,
            "scheme": task.scheme,
            "shape": list(task.source.shape),
            "sse": stats.sse,
            "sse_rtn": stats.sse_rtn,
            "signal": stats.signal,
            "blocks_changed": stats.blocks_changed,
            "blocks": stats.blocks,
        }
    )
    return outputs


@contextlib.contextmanager
def _thread_pool(threads: int | None) -> Iterator[Executor | None]:
    """A pool of single-threaded torch workers (coarse parallelism over row chunks).

    torch's intra-op threads synchronize on every small op, which collapses throughput on a shared or
    oversubscribed machine (measured 8-13x slower here); one thread per worker with chunk-level
    parallelism does not.
    """
    workers = threads or len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            yield None
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvfp4-quantize") as pool:
                yield pool
    finally:
        torch.set_num_threads(previous)


def quantize_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    recipe: str = "nvfp4",
    scales: str = "rtn",
    exclude: Sequence[str] = (),
    calib: str | os.PathLike | None = None,
    output_format: str = "modelopt",
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    threads: int | None = None,
) -> Path:
    """Quantize a Hugging Face safetensors checkpoint to NVFP4 (ModelOpt or compressed-tensors layout).

    Args:
        src_dir: input model directory (config.json + BF16/FP16/FP32 safetensors, sharded or not).
        dst_dir: output directory; must not exist unless `force`.
        recipe: "nvfp4" (W4A4, needs `calib`), "w4a16" (weight-only) or "mixed" (experts NVFP4, attention and
            dense MLP FP8, the rest source precision; static scales with `calib`, else W4A16 + block FP8).
        scales: block-scale rule "rtn" (ModelOpt), "four-over-six" or "mse".
        exclude: extra fnmatch patterns of module names to keep in source precision.
        calib: text file to calibrate activation scales on (runs the source model with transformers on CPU).
        output_format: "modelopt" or "compressed-tensors".
        force: replace an existing `dst_dir`.
        progress: show a tqdm bar (tensors and bytes).
        max_shard_bytes: output shard size bound.
        threads: worker threads (default: the CPUs this process may run on).
    Returns:
        The output directory.
    Raises:
        ConfigError: bad option (recipe, scales, format, nvfp4 without calib, existing dst).
        CheckpointError: unreadable or already-quantized input.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if scales not in SCALE_METHODS:
        raise ConfigError(f"--scales: unknown rule {scales!r}; expected one of {', '.join(SCALE_METHODS)}")
    if not src.is_dir():
        raise CheckpointError("input model directory not found", file=str(src))
    if dst.absolute() == src.absolute():
        raise ConfigError("the output directory must differ from the input directory")
    check_output_dir(dst, force=force)
    if recipe == "nvfp4" and calib is None:
        raise ConfigError(
            "--recipe nvfp4 (W4A4) needs activation scales: pass --calib FILE (a text to calibrate on), "
            "or use --recipe w4a16 for weight-only NVFP4"
        )
    config = _read_config(src)
    tensors = list_source_tensors(src)
    _reject_quantized(src, config, tensors)
    tasks = plan_tasks(
        tensors, recipe=recipe, calibrated=calib is not None, exclude=exclude, output_format=output_format
    )
    if all(task.action == "copy" for task in tasks):
        raise ConfigError(
            f"nothing to quantize in {src}: every weight is excluded or not a 2-D/expert weight"
        )
    for task in tasks:
        if task.reason:
            log.warning("keeping %s in %s: %s", task.source.name, task.source.dtype, task.reason)
    amax: dict[str, float] = {}
    if calib is not None:
        from nvfp4_ext.quantize.calibrate import collect_activation_amax

        amax = collect_activation_amax(src, calib, {t.name for t in tensors})
        static = [m for t in tasks if t.scheme in ("nvfp4", "fp8") for m in t.modules]
        missing = [m for m in static if amax.get(m, 0.0) <= 0]
        if missing:
            raise ConfigError(
                f"--calib: no activations reached {len(missing)} module(s) during calibration (e.g. "
                f"{', '.join(missing[:3])}); use a longer or more varied text, or --recipe w4a16"
            )
    result = QuantizeResult()
    shards = _shard_plan(tasks, max_shard_bytes)
    try:
        with atomic_output_dir(dst, force=force) as tmp:
            with _thread_pool(threads) as pool:
                run = _Run(scales, output_format, amax, pool, result)
                _write_shards(shards, tmp, run, progress)
            _write_configs(tmp, config, tasks, output_format)
            _write_provenance(
                tmp, src, tasks, result, recipe=recipe, scales=scales, output_format=output_format
            )
            copy_aux_files(src, tmp)
    except OSError as exc:
        raise Nvfp4ExtError(f"writing the output failed ({exc}); nothing was written to {dst}") from exc
    return dst


def _write_shards(shards: list[list[TensorTask]], out: Path, run: _Run, progress: bool) -> None:
    """Quantize every task into its planned shard, overlapping I/O with compute.

    One thread reads the next input tensor while the current one is quantized, and one thread writes a
    tensor's outputs while the next is quantized (in plan order: a single writer thread is a FIFO). At most
    two input tensors and two tensors' outputs are alive, so peak memory stays a few tensors. Writes can
    block on a busy disk for seconds; the quantizer does not wait for them until the end.
    """
    from tqdm.auto import tqdm

    total_bytes = sum(task.source.nbytes for shard in shards for task in shard)
    count = sum(len(shard) for shard in shards)
    written: list[tuple[str, list[OutputTensor]]] = []
    ordered = [(index, task) for index, shard in enumerate(shards) for task in shard]
    writers: list[ShardWriter] = []
    with (
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4-read") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4-write") as writer_thread,
    ):
        pending: Future[None] | None = None
        try:
            upcoming = reader.submit(map_tensor, ordered[0][1].source) if ordered else None
            for position, (index, task) in enumerate(ordered):
                if len(writers) <= index:
                    name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
                    plan = [o for t in shards[index] for o in t.outputs]
                    writers.append(ShardWriter(out / name, plan))
                    written.append((name, plan))
                assert upcoming is not None
                w = upcoming.result()
                if position + 1 < len(ordered):
                    upcoming = reader.submit(map_tensor, ordered[position + 1][1].source)
                outputs = _process(task, w, run)
                del w
                if pending is not None:
                    pending.result()  # previous outputs written: bounded memory, write errors surface here
                last_of_shard = position + 1 == len(ordered) or ordered[position + 1][0] != index
                pending = writer_thread.submit(_write_outputs, writers[index], outputs, last_of_shard)
                bar.update(task.source.nbytes)
                bar.set_postfix_str(f"{position + 1}/{count} tensors", refresh=False)
            if pending is not None:
                pending.result()
        except BaseException:
            reader.shutdown(wait=True, cancel_futures=True)
            writer_thread.shutdown(wait=True, cancel_futures=True)
            for writer in writers:
                writer.abort()
            raise
    write_index(out, written)


def _write_outputs(writer: ShardWriter, outputs: list[tuple[str, torch.Tensor]], close: bool) -> None:
    for out_name, tensor in outputs:
        writer.write(out_name, tensor)
    if close:
        writer.close()


def _write_configs(out: Path, config: dict, tasks: list[TensorTask], fmt: str) -> None:
    config = dict(config)
    if fmt == "modelopt":
        flat, legacy = modelopt_configs(tasks)
        config["quantization_config"] = flat
        (out / "hf_quant_config.json").write_text(json.dumps(legacy, indent=2) + "\n")
    else:
        config["quantization_config"] = compressed_tensors_config(tasks)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_provenance(
    out: Path, src: Path, tasks: list[TensorTask], result: QuantizeResult, **options: str
) -> None:
    fused = {
        t.fused.source: {
            "parent": t.fused.parent,
            "projections": list(t.fused.projections),
            "num_experts": t.fused.num_experts,
            "shape": list(t.fused.shape),
            "dtype": t.fused.dtype,
        }
        for t in tasks
        if t.fused is not None
    }
    provenance = {
        "version": 1,
        **options,
        "source": str(src.absolute()),
        "source_tensors": {
            t.source.name: {"dtype": t.source.dtype, "shape": list(t.source.shape)} for t in tasks
        },
        "fused_experts": fused,
        "kept": {t.source.name: t.reason for t in tasks if t.reason},
        "layers": result.layers,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
