"""MTP speculative decoding on the demo model: acceptance rate and speed-up, greedy, same process.

    python benchmarks/mtp_speculative.py [--model routed/demo_model] [--tokens 64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.sampling import SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\n\nclass ", "    def __init__(self", "# Copyright", "for i in range("]


def run(engine: LLMEngine, tokens: int) -> tuple[float, list[list[int]]]:
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    for i, p in enumerate(ids):
        engine.add_request(p, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), f"r{i}")
    out: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return time.perf_counter() - start, [out[f"r{i}"] for i in range(len(PROMPTS))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).parents[1] / "routed" / "demo_model"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=1, help="1: one request at a time (batch-1 decode)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = {spec: LLMEngine.from_pretrained(args.model, "bf16", EngineConfig(
        speculative=spec, max_num_seqs=args.max_num_seqs), progress=False) for spec in (None, "mtp")}
    times: dict[str | None, list[float]] = {None: [], "mtp": []}
    outputs = {}
    for _ in range(args.repeats):
        for spec, engine in engines.items():
            seconds, outputs[spec] = run(engine, args.tokens)
            times[spec].append(seconds)
    stats = engines["mtp"].stats()
    plain, spec = statistics.median(times[None]), statistics.median(times["mtp"])
    n = len(PROMPTS) * args.tokens
    print(f"{len(PROMPTS)} prompts x {args.tokens} greedy tokens, max_num_seqs {args.max_num_seqs}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"plain:       {n / plain:7.1f} tok/s  ({plain:.2f} s)")
    print(f"MTP drafts:  {n / spec:7.1f} tok/s  ({spec:.2f} s)  speed-up {plain / spec:.2f}x")
    print(f"acceptance:  {stats.spec_acceptance_rate:.1%} of {stats.spec_drafted} drafts; "
          f"{n / (stats.spec_drafted / args.repeats + 1e-9):.2f} tokens per verify step")
    print(f"greedy outputs identical: {outputs[None] == outputs['mtp']}")


if __name__ == "__main__":
    main()
