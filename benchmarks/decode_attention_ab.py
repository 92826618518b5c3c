"""Decode at batch 1, the compiled step's two forms of the one-query attention in one process, interleaved:
fused multiply-sums (routed's choice up to FUSED_MAX_KEYS keys) against the two matmuls (its choice beyond).

The compiled step reads `routed.model.attention.FUSED_MAX_KEYS` when it is traced: a second set of compiled
functions, traced with it at 0, always takes the matmuls; each round switches the model between the two plans.

    python benchmarks/decode_attention_ab.py --model checkpoints/small --rounds 6 [--quant int8]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from routed.bench import _decode
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.model import attention
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
    model = load_model(args.model, "bf16", progress=False, quant=args.quant)
    engine = LLMEngine(model, Tokenizer.from_pretrained(args.model),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    rng = random.Random(0)
    plans = {"fused sums": model._one_token_plan}
    saved, attention.FUSED_MAX_KEYS = attention.FUSED_MAX_KEYS, 0
    model._decode_fns = {}  # fresh functions, traced with the threshold at 0: the matmuls at every context
    assert model.compile_decode()
    attention.FUSED_MAX_KEYS = saved
    plans["matmuls"] = model._one_token_plan
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
    print(json.dumps({"quant": args.quant or "bf16", "gen_len": args.gen_len, "context": f"16..{16 + args.gen_len}",
                      "decode_b1_tok_s_median": {k: round(v, 1) for k, v in med.items()},
                      "all": {k: " ".join(f"{x:.1f}" for x in v) for k, v in rates.items()},
                      "ratio": round(med["fused sums"] / med["matmuls"], 3)}, indent=2))


if __name__ == "__main__":
    main()
