"""Load test of `routed serve`: N concurrent streaming clients on loopback.

For each concurrency level, every client sends requests back to back (prompt of --prompt-len tokens, exactly
--gen-len generated tokens with ignore_eos) until --requests requests are done; reported per level, median
over --repeats runs: output tokens/s of the whole server, time to first token and time per output token
(p50, p99 over all requests of the run).

    python benchmarks/serve_load.py --model checkpoints/small --concurrency 1,4,16 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "routed.cli", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "bench", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], gen_len: int) -> tuple[float, float]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": gen_len, "stream": True, "ignore_eos": True,
            "temperature": 0}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return first - start, (end - first) / max(gen_len - 1, 1)


async def run_level(url: str, concurrency: int, requests: int, prompt_len: int, gen_len: int,
                    seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 100000) for _ in range(prompt_len)] for _ in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts, tpots = [], []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            ttft, tpot = await one_request(client, url, queue.get_nowait(), gen_len)
            ttfts.append(ttft)
            tpots.append(tpot)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"throughput_tok_s": requests * gen_len / wall, "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99),
            "tpot_p50": pct(tpots, 0.5), "tpot_p99": pct(tpots, 0.99), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=0, help="requests per run (default 2 x concurrency, min 4)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("server_args", nargs="*", help="extra `routed serve` flags after --")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    proc, url = start_server(args.model, ["--max-num-seqs", str(max(levels)), *args.server_args])
    console = Console(stderr=True)
    results = {}
    try:
        asyncio.run(run_level(url, 1, 1, args.prompt_len, 4, 0))  # warm-up
        for c in levels:
            n = args.requests or max(4, 2 * c)
            runs = []
            for r in range(args.repeats):
                runs.append(asyncio.run(run_level(url, c, n, args.prompt_len, args.gen_len, seed=r)))
                console.print(f"concurrency {c} run {r + 1}/{args.repeats}: "
                              f"{runs[-1]['throughput_tok_s']:.1f} tok/s")
            results[c] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            results[c]["spread_tok_s"] = max(x["throughput_tok_s"] for x in runs) - min(
                x["throughput_tok_s"] for x in runs)
            results[c]["requests"] = n
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    table = Table("concurrency", "requests", "output tok/s (median)", "spread", "TTFT p50/p99 s",
                  "TPOT p50/p99 ms", f"x vs {levels[0]}")
    base = results[levels[0]]["throughput_tok_s"]
    for c, r in results.items():
        table.add_row(str(c), str(r["requests"]), f"{r['throughput_tok_s']:.1f}", f"{r['spread_tok_s']:.1f}",
                      f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}",
                      f"{1000 * r['tpot_p50']:.0f} / {1000 * r['tpot_p99']:.0f}", f"{r['throughput_tok_s'] / base:.1f}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
