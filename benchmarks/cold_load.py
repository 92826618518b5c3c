"""Cold load: `load_model` with the checkpoint out of the page cache, reading each file in its own order (routed's)
against the model's order (the parameters' order, which seeks back and forth in the file), one process.

Before each load the page cache is dropped (`/proc/sys/vm/drop_caches`: root); the process's own libraries stay
mapped, so what is timed is the weights' reads and what the load does with them. Rounds alternate the two orders;
a bare read of the files (front to back, 16 MB reads) is the disk's own rate.

    sudo python benchmarks/cold_load.py --model checkpoints/small --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from routed import loader
from routed.errors import RoutedError, run_script
from routed.progress import progress_bar


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise RoutedError(f"dropping the page cache needs root ({e.strerror}); run this benchmark as root") from e


def bare_read(files: list[Path]) -> float:
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
    return time.perf_counter() - start


def timed_load(path: str, order: str) -> float:
    if order == "model":  # the loader's `sorted(table, key=offset)` made a no-op: the table's (parameters') order
        loader.sorted = lambda names, key=None: list(names)  # type: ignore[attr-defined]
    try:
        start = time.perf_counter()
        model = loader.load_model(path, "bf16", progress=False, routing_telemetry=False)
        seconds = time.perf_counter() - start
    finally:
        loader.__dict__.pop("sorted", None)
    del model
    gc.collect()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(Path(args.model).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"error: no *.safetensors in {args.model}")
    drop_caches()
    timed_load(args.model, "file")  # warm-up: the libraries, the kernels, inductor's cache
    seconds: dict[str, list[float]] = {"bare read": [], "file order": [], "model order": []}
    with progress_bar("cold loads", total=args.rounds * 3) as advance:
        for r in range(args.rounds):
            for order in ("file", "model") if r % 2 == 0 else ("model", "file"):
                drop_caches()
                seconds[f"{order} order"].append(timed_load(args.model, order))
                advance()
            drop_caches()
            seconds["bare read"].append(bare_read(files))
            advance()
    gb = sum(f.stat().st_size for f in files) / 1e9
    result = {"model": args.model, "gb": round(gb, 3), "rounds": args.rounds,
              "median_s": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
              "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
              "model_over_file_per_round": round(statistics.median(
                  m / f for m, f in zip(seconds["model order"], seconds["file order"])), 2)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for k, v in result["median_s"].items():
        print(f"{k:12s} {v:6.2f} s  ({gb / v:.2f} GB/s)")
    print(f"model order / file order, per round: {result['model_over_file_per_round']}x")


if __name__ == "__main__":
    run_script(main)
