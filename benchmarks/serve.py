"""Serving throughput and latency: our batching engine vs the same server one request at a time.

    python benchmarks/serve.py           # 200 requests at concurrency 16, 3 repeats; prints
    python benchmarks/serve.py --write   # the same, then rewrites its benchmarks/README.md section
    python benchmarks/serve.py --quick   # a smoke run (40 requests, 1 repeat), writes nothing

What runs: `posttrain serve posttrain/world/base` (the tiny world's 1.1M-parameter Llama) in
a fresh subprocess per run, on a free loopback port, with `max_batch_size=16` (batched) or
`max_batch_size=1` (one request at a time, everything else identical). The client, in this
process, sends the same requests to both: chat completions of tiny-world task prompts (every
task kind in turn), `max_tokens=32`, temperature 0.7, `seed` = the request's number, so both
sides sample the same replies; at most `concurrency` requests are in flight (asyncio +
httpx), the first `warmup` requests are sent and discarded before timing starts.

What is measured: wall time from the first timed request sent to the last answer received;
requests/s = requests / wall time; tokens/s = generated tokens (the responses' `usage.
completion_tokens`) / wall time; latency per request (send to full answer) p50 and p99; error
count (any non-200 answer or transport error; must be 0). Runs alternate between the two
settings; cells give the median over repeats with the min-max spread, and the speed-up is the
ratio of median requests/s measured in the same invocation.

Simplified on purpose: loopback only (no network latency), non-streamed requests, CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
SERVER = "import sys; from posttrain.serve.cli import main; main(sys.argv[1:])"


def prompts(n: int) -> list[str]:
    """`n` tiny-world task prompts, every sub-kind in turn."""
    sys.path.insert(0, str(ROOT))
    from posttrain.world.tasks import SUBS, all_items, make_task

    subs = list(SUBS)
    out = []
    for i in range(n):
        sub = subs[i % len(subs)]
        items = all_items(sub)
        out.append(make_task(sub, items[(i * 7919) % len(items)], i).prompt)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch_size: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [model, f"port={port}", f"max_batch_size={max_batch_size}", "name=world"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **common.omp_env(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not come up within 120 s")


async def load(url: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Send every prompt (at most `concurrency` in flight); timings, tokens and errors."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens, errors = 0, []

    async def one(client: httpx.AsyncClient, i: int, text: str) -> None:
        nonlocal tokens
        body = {
            "model": "world",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": i,
        }
        async with gate:
            start = time.perf_counter()
            try:
                r = await client.post(url + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    return
                tokens += r.json()["usage"]["completion_tokens"]
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                return
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, t) for i, t in enumerate(texts)))
        wall = time.perf_counter() - start
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {
        "requests": len(texts),
        "seconds": wall,
        "requests_per_s": len(texts) / wall,
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "p50_ms": 1000 * pick(0.50),
        "p99_ms": 1000 * pick(0.99),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def run_once(args, max_batch_size: int, texts: list[str], warm: list[str]) -> dict:
    proc, url = start_server(args.model, max_batch_size, args.threads)
    try:
        asyncio.run(load(url, warm, args.concurrency, args.max_tokens))
        result = asyncio.run(load(url, texts, args.concurrency, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result["load"] = os.getloadavg()[0]
    return result


def report(args, results: dict[int, list[dict]], seconds: float) -> str:
    def cell(key: str, size: int, fmt: str) -> str:
        return common.median_spread([r[key] for r in results[size]], fmt)

    one = statistics.median(r["requests_per_s"] for r in results[1])
    rows = []
    for size in (args.batch, 1):
        speedup = statistics.median(r["requests_per_s"] for r in results[size]) / one
        rows.append([
            "batched" if size > 1 else "one at a time", str(size),
            cell("requests_per_s", size, "{:.1f}"), cell("tokens_per_s", size, "{:.0f}"),
            cell("p50_ms", size, "{:.0f}"), cell("p99_ms", size, "{:.0f}"),
            str(sum(r["errors"] for r in results[size])),
            f"**{speedup:.2f}x**" if size > 1 else "1.00x",
        ])  # fmt: skip
    headers = ["server", "max_batch_size", "requests/s", "tokens/s", "p50 ms", "p99 ms"]
    table = common.markdown_table([*headers, "errors", "speed-up"], rows)
    loads = [r["load"] for rs in results.values() for r in rs]
    return "\n".join([
        f"Command: `python benchmarks/serve.py --write` ({seconds / 60:.0f} min in all, on a shared machine).",
        "",
        f"Machine: {common.machine()}; {common.versions('torch', 'transformers', 'fastapi', 'uvicorn', 'httpx')};",
        f"server torch threads: {args.threads or 'default'}, OMP_WAIT_POLICY=PASSIVE, fp32. Load average after",
        f"the runs: {min(loads):.1f} to {max(loads):.1f}.",
        "",
        f"Model: the tiny world base (`{args.model}`). Load: {args.requests} chat completions of",
        f"tiny-world task prompts at concurrency {args.concurrency} on loopback (after {args.warmup}",
        f"warm-up requests), `max_tokens={args.max_tokens}`, temperature 0.7, seed = request",
        "number (both settings sample the same replies). Each run is a fresh server process;",
        f"{args.repeats} repeats per row, alternating; median (min-max).",
        "",
        table,
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="posttrain/world/base")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched run")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="server torch threads; 0 = default")
    parser.add_argument("--quick", action="store_true", help="40 requests, 1 repeat, no write")
    parser.add_argument("--write", action="store_true", help="rewrite the README section")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats, args.write = 40, 1, False
    all_texts = prompts(args.requests + args.warmup)
    warm, texts = all_texts[: args.warmup], all_texts[args.warmup :]
    results: dict[int, list[dict]] = {args.batch: [], 1: []}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for size in (args.batch, 1):
            r = run_once(args, size, texts, warm)
            results[size].append(r)
            print(
                f"repeat {repeat} max_batch_size={size}: {r['requests_per_s']:.1f} req/s, "
                f"{r['tokens_per_s']:.0f} tok/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                f"errors {r['errors']} {r['first_error']} (load {r['load']:.1f})",
                flush=True,
            )
    text = report(args, results, time.perf_counter() - start)
    print("\n" + text)
    if any(r["errors"] for rs in results.values() for r in rs):
        sys.exit("errors occurred: the table is not written")
    if args.write:
        common.update_readme("Serving: batched vs one request at a time (CPU)", text)


if __name__ == "__main__":
    main()
