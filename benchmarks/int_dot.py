"""routed's int8 dot-product kernel (`routed/quant/csrc/int_dot.cpp`, AVX2 CPUs) against PyTorch's weight-only
`_weight_int8pack_mm`, in one process:

* `--shapes`: one-row products of `small`'s shapes with cold weights (copies of the weight cycled through
  ~400 MB, so each call reads it from memory), beside an fp32 `torch.sum` over as many bytes (the memory's rate);
* `--model`: int8 decode, two copies of the model loaded and compiled in one process — one on the weight-only
  kernels (and FBGEMM's 7-bit lm_head), one on `int8_dot` — alternating rounds of greedy decoding.

    python benchmarks/int_dot.py --shapes --threads 2
    python benchmarks/int_dot.py --model checkpoints/small --threads 2 --rounds 8 --batch 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from routed.bench import _decode
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.progress import progress_bar
from routed.quant import kernels
from routed.tokenizer import Tokenizer

SHAPES = [(512, 1024), (1024, 512), (1536, 1024), (2816, 1024), (1024, 2816), (129280, 1024)]


def shapes(repeats: int) -> dict:
    assert kernels.int_dot(), "routed's int8 kernel is not available on this machine"
    out = {}
    for N, K in SHAPES:
        copies = max(1, 400_000_000 // (N * K))
        ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(copies)]
        ss = [torch.rand(N).bfloat16() / 100 for _ in range(copies)]
        fs = [torch.randn(N * K // 4) for _ in range(copies)]
        x = torch.randn(1, K).bfloat16()
        paths = {"_weight_int8pack_mm": lambda i: torch.ops.aten._weight_int8pack_mm(x, ws[i], ss[i]),
                 "int8_dot": lambda i: torch.ops.routed.int8_dot(x, ws[i], ss[i]),
                 "fp32 sum": lambda i: fs[i].sum()}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(repeats):
            for name, f in paths.items():
                start = time.perf_counter()
                for i in range(copies):
                    f(i)
                times[name].append((time.perf_counter() - start) / copies)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"{N}x{K}"] = {"us": {k: round(v * 1e6, 1) for k, v in med.items()},
                           "GB_s": {k: round(N * K / v / 1e9, 2) for k, v in med.items()},
                           "speedup": round(med["_weight_int8pack_mm"] / med["int8_dot"], 3)}
        print(f"{N}x{K}: " + "  ".join(f"{k} {v * 1e6:.0f} us ({N * K / v / 1e9:.1f} GB/s)" for k, v in med.items())
              + f"  -> {out[f'{N}x{K}']['speedup']:.2f}x", flush=True)
    return out


def load(path: str, with_kernel: bool):
    kernels.WANTED, kernels.INT8_DOT = with_kernel, False
    kernels.int_dot.cache_clear()
    model = load_model(path, "bf16", quant="int8", progress=False, routing_telemetry=False)
    engine = LLMEngine(model, Tokenizer.from_pretrained(path),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    return engine


def decode_ab(path: str, rounds: int, batch: int, gen: int) -> dict:
    rng = random.Random(0)
    engines = {}
    for name, flag in (("weight-only", False), ("int8_dot", True)):
        engines[name] = (load(path, flag), flag)
        _decode(engines[name][0], batch, 4, rng)  # compiles the step with this kernel choice
    rates: dict[str, list[float]] = {k: [] for k in engines}
    with progress_bar(f"int8 decode b{batch}", total=2 * rounds) as advance:
        for r in range(rounds):
            for name, (engine, flag) in (engines.items() if r % 2 == 0 else reversed(engines.items())):
                kernels.INT8_DOT = flag  # eager products (prefill's few rows) follow the model's choice
                kernels.int_dot.cache_clear()
                kernels.WANTED = flag
                rates[name].append(_decode(engine, batch, gen, rng))
                advance()
    per_round = [b / a for a, b in zip(rates["weight-only"], rates["int8_dot"])]
    out = {"batch": batch, "rounds": rounds, "tok_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
           "ratio_of_medians": round(statistics.median(rates["int8_dot"]) / statistics.median(rates["weight-only"]), 3),
           "median_per_round": round(statistics.median(per_round), 3)}
    print(json.dumps(out, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", action="store_true", help="time one-row products of small's shapes, cold")
    ap.add_argument("--model", help="a float checkpoint folder: int8 decode both ways, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    if not (args.shapes or args.model):
        ap.error("give --shapes, --model PATH, or both")
    torch.set_num_threads(args.threads)
    if args.shapes:
        shapes(args.repeats)
    if args.model:
        decode_ab(args.model, args.rounds, args.batch, args.gen)


if __name__ == "__main__":
    main()
