"""bf16 decode at batch 1 on three paths, in one process, alternating: eager PyTorch, the compiled one-row GEMV
(routed/model/gemv.py) alone, and the compiled one-token step (Transformer.compile_decode, what the loader
turns on); plus transformers on the same checkpoint for the ratio the speed issue asks for.

    python benchmarks/decode_b1.py --model checkpoints/small --threads 2 --gen 32 --repeats 3
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
    model = load_model(args.model, "bf16", progress=False, routing_telemetry=False)
    engine = LLMEngine(model, Tokenizer.from_pretrained(args.model),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    rng = random.Random(0)
    assert gemv.enable() and model.compile_decode()  # the loader did both for small; compiled once
    kernel, plan = gemv._state["kernel"], model._one_token_plan
    paths = {"eager": (None, None), "compiled GEMV": (kernel, None), "compiled step": (kernel, plan)}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    _decode(engine, 1, 4, rng)  # warm up
    with progress_bar("decode b1", total=len(paths) * args.repeats) as advance:
        for _ in range(args.repeats):
            for name, (k, b) in paths.items():
                gemv._state["kernel"], model._one_token_plan = k, b
                rates[name].append(_decode(engine, 1, args.gen, rng))
                advance()
    del engine, model
    hf = bench_transformers(args.model, 64, min(args.gen, 32), args.repeats, "bf16")
    out = {"threads": args.threads, "decode_b1_tok_s": {k: statistics.median(v) for k, v in rates.items()},
           "spread": {k: max(v) - min(v) for k, v in rates.items()}, "transformers_decode_b1_tok_s": hf["decode_b1"]}
    out["ratio_vs_transformers"] = {k: v / hf["decode_b1"] for k, v in out["decode_b1_tok_s"].items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
