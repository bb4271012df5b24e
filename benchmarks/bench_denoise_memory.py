"""Peak extra memory of one DiffusionGemma denoise step per request: naive [rows, vocab] path vs fused stats.

One step turns the decoder's final hidden states [requests * canvas, H] into argmax, a sample, the entropy,
the top probability and the self-conditioning soft embedding. The naive path (what HF and vLLM do)
materializes fp32 [rows, vocab] logits and probabilities; `fused_denoise_stats` walks the vocabulary in
chunks. Defaults: DiffusionGemma's real vocab (262144) and canvas (256) with a small hidden size (the
temporaries scale with vocab, not H).

Two measurements (CPU):
  * tensor accounting: a TorchDispatchMode adds up the storage of every tensor the step creates while it
    is alive (kernel-internal scratch is not seen) -> exact, deterministic peak;
  * RSS: the step runs in a fresh subprocess with glibc's mmap threshold pinned low, and the peak RSS
    (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the step is reported (Linux only).
Goal: fused peak <= canvas * vocab * 4 B / 16 per request.

    python benchmarks/bench_denoise_memory.py [--vocab 262144 --canvas 256 --hidden 64 --requests 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nvfp4_ext.diffusion.stats import DEFAULT_CHUNK, fused_denoise_stats, softcap


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode while they are alive, and their peak.

    Storages aliased from tensors created outside (views of the inputs, in-place updates) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, input_storages: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self._storages:
            if key in input_storages:  # a view or in-place result of a tensor from outside the step
                return
            self._storages[key] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._storages[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]


def naive_step(hidden: torch.Tensor, weight: torch.Tensor, temps: torch.Tensor, embed_scale: float):
    """The [rows, vocab] step as HF/vLLM compute it: logits, tempered log-softmax, probabilities, entropy,
    a multinomial sample, the argmax and probs @ E."""
    z = softcap(hidden @ weight.T, 30.0) / temps[:, None]
    log_p = torch.log_softmax(z, dim=-1)
    probs = log_p.exp()
    entropy = -(probs * log_p).sum(-1)
    sample = torch.multinomial(probs, 1).squeeze(-1)
    soft = (probs @ weight.float()) * embed_scale
    return z.argmax(-1), sample, entropy, probs.max(-1).values, soft


def fused_step(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temps: torch.Tensor,
    embed_scale: float,
    chunk: int = DEFAULT_CHUNK,
):
    return fused_denoise_stats(
        hidden, weight, temps, seed=0, cap=30.0, embed_scale=embed_scale, chunk_size=chunk
    )


def _inputs(rows: int, hidden: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(rows, hidden, generator=gen),
        torch.randn(vocab, hidden, generator=gen) * 0.05,
        torch.full((rows,), 0.6),
    )


def measure_tensor_bytes(path: str, rows: int, hidden: int, vocab: int, chunk: int) -> int:
    h, weight, temps = _inputs(rows, hidden, vocab)
    step = naive_step if path == "naive" else lambda *a: fused_step(*a, chunk=chunk)
    with torch.no_grad(), LiveTensorBytes() as tracker:
        result = step(h, weight, temps, hidden**0.5)
        del result
    return tracker.peak


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_rss_child(path: str, rows: int, hidden: int, vocab: int, chunk: int) -> int:
    """Runs in a subprocess: peak RSS increase of one step, in bytes."""
    h, weight, temps = _inputs(rows, hidden, vocab)
    step = naive_step if path == "naive" else lambda *a: fused_step(*a, chunk=chunk)
    with torch.no_grad():
        step(h[:1], weight[:chunk], temps[:1], hidden**0.5)  # warm up lazy init outside the window
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS")
        step(h, weight, temps, hidden**0.5)
        return (_rss_kib("VmHWM") - before) * 1024


def measure_rss(path: str, rows: int, hidden: int, vocab: int, chunk: int) -> int | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        path,
        "--rows",
        str(rows),
        "--hidden",
        str(hidden),
        "--vocab",
        str(vocab),
        "--chunk",
        str(chunk),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurement")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--child", choices=["naive", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(measure_rss_child(args.child, args.rows, args.hidden, args.vocab, args.chunk))
        return 0

    goal = args.canvas * args.vocab * 4 / 16
    # correctness first: the fused statistics must agree with the naive ones on a slice of this shape
    h, weight, temps = _inputs(8, args.hidden, min(args.vocab, 20000))
    naive, fused = naive_step(h, weight, temps, 1.0), fused_step(h, weight, temps, 1.0, chunk=args.chunk)
    assert torch.equal(naive[0], fused.argmax), "fused argmax disagrees with the naive step"
    torch.testing.assert_close(naive[2], fused.entropy, rtol=1e-4, atol=1e-4)

    rows_out = []
    print(
        f"vocab {args.vocab}, canvas {args.canvas}, hidden {args.hidden}, chunk {args.chunk}; "
        f"goal per request <= canvas*vocab*4/16 = {goal / 2**20:.2f} MiB"
    )
    print(
        f"{'requests':>8} {'path':>6} {'tensor peak MiB/req':>20} {'RSS peak MiB/req':>17} "
        f"{'ratio to goal':>14}"
    )
    for requests in args.requests:
        rows = requests * args.canvas
        for path in ("naive", "fused"):
            tensor_peak = measure_tensor_bytes(path, rows, args.hidden, args.vocab, args.chunk)
            rss_peak = None if args.no_rss else measure_rss(path, rows, args.hidden, args.vocab, args.chunk)
            row = {
                "requests": requests,
                "path": path,
                "tensor_peak_bytes_per_request": tensor_peak / requests,
                "rss_peak_bytes_per_request": None if rss_peak is None else rss_peak / requests,
                "goal_bytes_per_request": goal,
            }
            rows_out.append(row)
            rss_text = "n/a" if rss_peak is None else f"{rss_peak / requests / 2**20:.2f}"
            print(
                f"{requests:>8} {path:>6} {tensor_peak / requests / 2**20:>20.2f} {rss_text:>17} "
                f"{tensor_peak / requests / goal:>14.3f}"
            )
        naive_row, fused_row = rows_out[-2], rows_out[-1]
        ratio = fused_row["tensor_peak_bytes_per_request"] / naive_row["tensor_peak_bytes_per_request"]
        print(f"{'':>8} fused/naive = {ratio:.4f} (1/{1 / ratio:.0f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env = {
            "torch": torch.__version__,
            "device": "cpu",
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "rows", "out")},
        }
        args.out.write_text(json.dumps({"env": env, "rows": rows_out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
