"""Decode at batch 1 in one process, interleaved: the compiled one-token step with DECODE_CHUNK consecutive
blocks per compiled call (routed's plan) against one block per call (a second set of compiled functions).

What it shows is the cost of a compiled call besides its kernels (dynamo's guards, the generated wrapper), paid
once per block at one block per call and once per chunk otherwise.

    python benchmarks/decode_chunk_ab.py --model checkpoints/small --rounds 6 [--quant int8|int4]
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
from routed.model import deepseek_v3
from routed.progress import progress_bar
from routed.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", choices=("int8", "int4"))
    ap.add_argument("--gen-len", type=int, default=32, help="tokens per round, after a 16-token prompt")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model, "bf16", progress=False, quant=args.quant)
    load_s = time.perf_counter() - start
    engine = LLMEngine(model, Tokenizer.from_pretrained(args.model),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    rng = random.Random(0)
    plans = {f"{deepseek_v3.DECODE_CHUNK} blocks per call": model._one_token_plan}
    saved, deepseek_v3.DECODE_CHUNK = deepseek_v3.DECODE_CHUNK, 1
    model._decode_fns = {}  # fresh functions: one graph per block kind, one call per block
    start = time.perf_counter()
    assert model.compile_decode()
    compile_one_s = time.perf_counter() - start
    deepseek_v3.DECODE_CHUNK = saved
    plans["1 block per call"] = model._one_token_plan
    rates: dict[str, list[float]] = {name: [] for name in plans}
    with torch.inference_mode(), progress_bar("decode A/B", total=len(plans) * (args.rounds + 1)) as advance:
        for plan in plans.values():  # warm-up
            model._one_token_plan = plan
            _decode(engine, 1, 8, rng)
            advance()
        for _ in range(args.rounds):
            for name, plan in plans.items():
                model._one_token_plan = plan
                rates[name].append(_decode(engine, 1, args.gen_len, rng))
                advance()
    med = {name: statistics.median(v) for name, v in rates.items()}
    a, b = plans
    print(json.dumps({"quant": args.quant or "bf16", "gen_len": args.gen_len, "threads": args.threads,
                      "load_s (with the chunked compile)": round(load_s, 1),
                      "compile_s (1 block per call)": round(compile_one_s, 1),
                      "calls per step": {name: len(plan) for name, plan in plans.items()},
                      "decode_b1_tok_s_median": {k: round(v, 1) for k, v in med.items()},
                      "all": {k: " ".join(f"{x:.1f}" for x in v) for k, v in rates.items()},
                      "ratio": round(statistics.median(x / y for x, y in zip(rates[a], rates[b])), 3)}, indent=2))


if __name__ == "__main__":
    main()
