"""Decode at batch 1 in one process, interleaved: the compiled one-token step with DECODE_CHUNK consecutive
blocks per compiled call (routed's plan) against chunks of one block kind only (the plan before 4b51158: `small`
as a dense call and a MoE call) and one block per call (each a second set of compiled functions).

What it shows is the cost of a compiled call besides its kernels (dynamo's guards, the generated wrapper), paid
once per block at one block per call and once per chunk otherwise.

    python benchmarks/decode_chunk_ab.py --model checkpoints/small --rounds 6 [--quant int8|int4]
"""

from __future__ import annotations

import json
import random
import statistics
import time

from compiled_plans import interleaved, plan_with, setup  # benchmarks/compiled_plans.py

from routed.model import deepseek_v3


def kind_chunks(model: deepseek_v3.Transformer) -> list:
    """The step as runs of up to DECODE_CHUNK consecutive blocks of one kind, a compiled function per kind."""
    fns: dict[type, object] = {}
    plan: list = []
    for i, layer in enumerate(model.model.layers):
        kind = type(layer.mlp)
        if kind not in fns:
            fns[kind] = model.compiled_blocks_fn(f"_kind_chunk_{kind.__name__}")  # as routed compiles its plan
        if plan and plan[-1][0] is fns[kind] and len(plan[-1][2]) < deepseek_v3.DECODE_CHUNK:
            plan[-1] = (fns[kind], plan[-1][1], plan[-1][2] + (layer,))
        else:
            plan.append((fns[kind], i, (layer,)))
    return plan  # compiled on its first steps: `interleaved` warms every plan up before timing


def main() -> None:
    args, engine, load_s = setup(__doc__.splitlines()[0])
    model = engine.model
    rng = random.Random(0)
    start = time.perf_counter()
    plans = {f"{deepseek_v3.DECODE_CHUNK} blocks per call": model._one_token_plan,
             "chunks of one kind": kind_chunks(model),
             "1 block per call": plan_with(model, deepseek_v3, "DECODE_CHUNK", 1)}
    compile_one_s = time.perf_counter() - start
    rates = interleaved(engine, plans, args.rounds, args.gen_len, rng)
    med = {name: statistics.median(v) for name, v in rates.items()}
    a, *others = plans
    print(json.dumps({"quant": args.quant or "bf16", "gen_len": args.gen_len, "threads": args.threads,
                      "load_s (with the chunked compile)": round(load_s, 1),
                      "compile_s (1 block per call)": round(compile_one_s, 1),
                      "calls per step": {name: len(plan) for name, plan in plans.items()},
                      "decode_b1_tok_s_median": {k: round(v, 1) for k, v in med.items()},
                      "all": {k: " ".join(f"{x:.1f}" for x in v) for k, v in rates.items()},
                      "ratio (median of rounds)": {f"{a} / {b}": round(statistics.median(
                          x / y for x, y in zip(rates[a], rates[b])), 3) for b in others}}, indent=2))


if __name__ == "__main__":
    main()
