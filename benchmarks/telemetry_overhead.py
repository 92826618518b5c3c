"""Cost of routing telemetry on decode at batch 1: the same engine with counting on and off, alternated.

    python benchmarks/telemetry_overhead.py --model checkpoints/small [--tokens 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.sampling import SamplingParams
from routed.tokenizer import Tokenizer


def decode_rate(engine: LLMEngine, tokens: int) -> float:
    engine.add_request(list(range(1000, 1016)), SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    engine.step()  # prefill + first token
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (tokens - 1) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    model = load_model(args.model, torch.bfloat16, progress=False)
    tok = Tokenizer.from_pretrained(args.model)
    engines = {on: LLMEngine(model, tok, EngineConfig(routing_telemetry=on, kv_cache_gb=0.25)) for on in (False, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    decode_rate(engines[True], 8)  # warm-up
    for _ in range(args.repeats):
        for on in (False, True):
            for _, gate in model.gates():
                gate.counting = on
            rates[on].append(decode_rate(engines[on], args.tokens))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    # the same cost measured in isolation (less noise): one router call for one token, counting on vs off
    gates = [g for _, g in model.gates()]
    x = torch.randn(1, model.config.hidden_size, dtype=model.dtype)
    per_call: dict[bool, float] = {}
    for counting in (False, True, False, True):
        gates[0].counting = counting
        start = time.perf_counter()
        for _ in range(2000):
            gates[0](x)
        per_call[counting] = min(per_call.get(counting, 1e9), (time.perf_counter() - start) / 2000)
    engine = engines[True]
    start = time.perf_counter()
    for _ in range(200):
        engine.routing.collect()
    collect_s = (time.perf_counter() - start) / 200
    extra = len(gates) * (per_call[True] - per_call[False]) + collect_s
    print(f"decode batch 1, {args.tokens} tokens, median of {args.repeats} alternated runs")
    print(f"telemetry off: {off:.2f} tok/s  (runs: {', '.join(f'{r:.1f}' for r in rates[False])})")
    print(f"telemetry on:  {on:.2f} tok/s  (runs: {', '.join(f'{r:.1f}' for r in rates[True])})")
    print(f"overhead end to end: {100 * (off - on) / off:+.2f}%")
    print(f"isolated: counting adds {1e6 * (per_call[True] - per_call[False]):.1f} us per router call x "
          f"{len(gates)} layers + {1e6 * collect_s:.1f} us per step to read the counters = {1e6 * extra:.0f} us "
          f"per decode step = {100 * extra * off:.2f}% of a {1000 / off:.1f} ms step")


if __name__ == "__main__":
    main()
