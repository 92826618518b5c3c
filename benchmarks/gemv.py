"""bf16 decode at batch 1 with the compiled one-row GEMV (routed/model/gemv.py) against eager F.linear, in one
process, alternating, plus transformers on the same checkpoint for the ratio the speed issue asks for.

    python benchmarks/gemv.py --model checkpoints/small --threads 1 --gen 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from routed.bench import _decode, bench_transformers
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.model import gemv
from routed.progress import progress_bar
from routed.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "bf16", progress=False)
    engine = LLMEngine(model, Tokenizer.from_pretrained(args.model),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    rng = random.Random(0)
    assert gemv.enable()  # the loader enabled it already for small (>= 256 MiB of bf16); compiled once
    _decode(engine, 1, 4, rng)  # warm up
    kernel = gemv._state["kernel"]
    rates: dict[str, list[float]] = {"compiled GEMV": [], "eager F.linear": []}
    with progress_bar("decode b1", total=2 * args.repeats) as advance:
        for _ in range(args.repeats):
            for name in rates:
                gemv._state["kernel"] = None if name == "eager F.linear" else kernel
                rates[name].append(_decode(engine, 1, args.gen, rng))
                advance()
    gemv._state["kernel"] = kernel
    del engine, model
    hf = bench_transformers(args.model, 64, min(args.gen, 32), args.repeats, "bf16")
    out = {"threads": args.threads, "decode_b1_tok_s": {k: statistics.median(v) for k, v in rates.items()},
           "spread": {k: max(v) - min(v) for k, v in rates.items()}, "transformers_decode_b1_tok_s": hf["decode_b1"]}
    out["ratio_vs_transformers"] = {k: v / hf["decode_b1"] for k, v in out["decode_b1_tok_s"].items()}
    out["gemv_speedup"] = out["decode_b1_tok_s"]["compiled GEMV"] / out["decode_b1_tok_s"]["eager F.linear"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
