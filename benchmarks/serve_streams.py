"""N concurrent streaming clients against any OpenAI-compatible server (vLLM/SGLang, CPU demo or GPU).

Each client sends `--requests` streaming completions one after another; all clients start together (the
batch-captioning stress pattern: 30 clients by default). Reports prompt and generation tokens/s over the wall
time, time to first token and end-to-end latency (p50/p99), and errors; `--out` writes the same as JSON.
Standard library only (threads + http.client).

    python benchmarks/serve_streams.py --base-url http://127.0.0.1:8000 --clients 30 --max-tokens 64 \
        --out benchmarks/results/cpu/serve_streams.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RequestResult:
    """One streamed request: timings in seconds, token counts from the server's usage block."""

    ok: bool
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Summary:
    clients: int
    requests: int
    errors: int
    wall_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _connection(base: urllib.parse.ParseResult, timeout: float) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
    return cls(base.hostname, base.port, timeout=timeout)


def first_model(base_url: str, timeout: float = 10.0) -> str:
    """The first model id the server lists at /v1/models."""
    base = urllib.parse.urlparse(base_url)
    conn = _connection(base, timeout)
    try:
        conn.request("GET", base.path.rstrip("/") + "/v1/models")
        response = conn.getresponse()
        return json.loads(response.read())["data"][0]["id"]
    finally:
        conn.close()


def stream_one(
    base_url: str, model: str, prompt: str, max_tokens: int, chat: bool, timeout: float
) -> RequestResult:
    """Send one streaming request and time it (TTFT = first chunk carrying generated text)."""
    base = urllib.parse.urlparse(base_url)
    path = base.path.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    body: dict = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    start = time.perf_counter()
    result = RequestResult(ok=False)
    conn = _connection(base, timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:200].decode(errors='replace')}"
            return result
        for raw in response:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = str(chunk["error"])[:200]
                return result
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text and result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - start
            usage = chunk.get("usage")
            if usage:
                result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                result.completion_tokens = int(usage.get("completion_tokens") or 0)
        result.latency_s = time.perf_counter() - start
        result.ok = result.completion_tokens > 0
        if not result.ok:
            result.error = "stream ended without generated tokens"
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        conn.close()
    return result


def run_clients(
    base_url: str,
    model: str,
    clients: int,
    requests: int,
    prompt: str,
    max_tokens: int,
    chat: bool,
    timeout: float,
) -> tuple[list[RequestResult], float]:
    """All clients start at a barrier; returns every result and the wall time."""
    results: list[RequestResult] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        barrier.wait()
        for r in range(requests):
            res = stream_one(
                base_url, model, f"{prompt} (client {index}, request {r})", max_tokens, chat, timeout
            )
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summarize(results: list[RequestResult], clients: int, wall_s: float) -> Summary:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    latency = [r.latency_s for r in ok if r.latency_s is not None]
    return Summary(
        clients=clients,
        requests=len(results),
        errors=len(results) - len(ok),
        wall_s=wall_s,
        prompt_tokens_per_s=sum(r.prompt_tokens for r in ok) / wall_s if wall_s else 0.0,
        generation_tokens_per_s=sum(r.completion_tokens for r in ok) / wall_s if wall_s else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        latency_p50_s=percentile(latency, 50),
        latency_p99_s=percentile(latency, 99),
        error_samples=sorted({r.error for r in results if r.error})[:5],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--requests", type=int, default=1, help="requests per client, sent one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Describe this picture in one detailed paragraph.")
    parser.add_argument(
        "--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request socket timeout (s)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary and every request as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be >= 1")
    try:
        model = args.model or first_model(args.base_url)
    except (OSError, http.client.HTTPException, KeyError, IndexError, json.JSONDecodeError) as exc:
        print(f"error: cannot list models at {args.base_url}/v1/models: {exc}", file=sys.stderr)
        return 2
    results, wall = run_clients(
        args.base_url,
        model,
        args.clients,
        args.requests,
        args.prompt,
        args.max_tokens,
        args.chat,
        args.timeout,
    )
    summary = summarize(results, args.clients, wall)
    fmt = lambda v: "n/a" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
    print(
        f"{summary.requests} requests from {summary.clients} clients in {summary.wall_s:.2f} s, "
        f"{summary.errors} errors"
    )
    print(
        f"prompt {summary.prompt_tokens_per_s:.1f} tok/s, "
        f"generation {summary.generation_tokens_per_s:.1f} tok/s"
    )
    print(
        f"TTFT p50 {fmt(summary.ttft_p50_s)} p99 {fmt(summary.ttft_p99_s)}; "
        f"latency p50 {fmt(summary.latency_p50_s)} p99 {fmt(summary.latency_p99_s)}"
    )
    for sample in summary.error_samples:
        print(f"  error: {sample}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env = {
            "base_url": args.base_url,
            "model": model,
            "python": platform.python_version(),
            "host": platform.node(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.out.write_text(
            json.dumps(
                {"env": env, "summary": asdict(summary), "requests": [asdict(r) for r in results]}, indent=1
            )
        )
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
