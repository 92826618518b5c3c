"""int4 weights widened to bf16 for a prefill GEMM: the compiled loop (`intq.enable_widen`) against the same
function eager, on `small`'s weight shapes, in one process, alternating; median µs per weight of N × K.

    python benchmarks/int4_widen.py [--threads 2] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from routed.malloc import keep_freed_memory
from routed.quant import intq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a loaded model runs: freed blocks reused, not faulted in afresh
    assert intq.enable_widen(torch.bfloat16, 32), "no compiler: nothing to compare"
    compiled = intq._WIDEN["kernel"]
    g = torch.Generator().manual_seed(0)
    results = {}
    # small's expert gate+up and down, its q_b, a row chunk of its dense down_proj
    for N, K in ((1024, 1024), (1024, 512), (1536, 384), (256, 2816)):
        nibbles, sz = intq.quantize_int4(torch.randn(N, K, generator=g), 32)
        packed = intq.pack_int4(nibbles)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        with torch.inference_mode():
            for i in range(args.repeats + 10):
                for name in (("eager", "compiled") if i % 2 else ("compiled", "eager")):
                    intq._WIDEN["kernel"] = compiled if name == "compiled" else None
                    start = time.perf_counter()
                    intq.widen_int4(packed, sz, torch.bfloat16)
                    if i >= 10:
                        times[name].append((time.perf_counter() - start) * 1e6)
        intq._WIDEN["kernel"] = compiled
        med = {k: statistics.median(v) for k, v in times.items()}
        results[f"{N}x{K}"] = {"eager_us": round(med["eager"]), "compiled_us": round(med["compiled"]),
                               "ratio": round(med["eager"] / med["compiled"], 2)}
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, "shapes": results}, indent=1))


if __name__ == "__main__":
    main()
