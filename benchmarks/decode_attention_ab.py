"""Decode at batch 1, the compiled step's two forms of the one-query attention in one process, interleaved:
fused multiply-sums (routed's choice up to FUSED_MAX_KEYS keys) against the two matmuls (its choice beyond).

The compiled step reads `routed.model.attention.FUSED_MAX_KEYS` when it is traced: a second set of compiled
functions, traced with it at 0, always takes the matmuls; each round switches the model between the two plans.

    python benchmarks/decode_attention_ab.py --model checkpoints/small --rounds 6 [--quant int8]
"""

from __future__ import annotations

import json
import random
import statistics

from compiled_plans import interleaved, plan_with, setup  # benchmarks/compiled_plans.py

from routed.model import attention


def main() -> None:
    args, engine, _ = setup(__doc__.splitlines()[0])
    model = engine.model
    rng = random.Random(0)
    plans = {"fused sums": model._one_token_plan,
             "matmuls": plan_with(model, attention, "FUSED_MAX_KEYS", 0)}  # threshold 0: matmuls at every context
    rates = interleaved(engine, plans, args.rounds, args.gen_len, rng)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(json.dumps({"quant": args.quant or "bf16", "gen_len": args.gen_len, "context": f"16..{16 + args.gen_len}",
                      "decode_b1_tok_s_median": {k: round(v, 1) for k, v in med.items()},
                      "all": {k: " ".join(f"{x:.1f}" for x in v) for k, v in rates.items()},
                      "ratio": round(med["fused sums"] / med["matmuls"], 3)}, indent=2))


if __name__ == "__main__":
    main()
