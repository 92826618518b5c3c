"""Resident memory of a serving process, phase by phase: the runtime, the load (and compile), the engine's cache,
then prefills one after another — with one prompt length (`routed bench`'s) or with lengths drawn from a range,
as a server sees them.

What grows with new prompts is state keyed by shapes (oneDNN keeps a compiled GEMM kernel per shape, up to 1024
of them; PyTorch's ideep its own cache) and the heap's high-water mark of transients; `gemv.gemm` pads row
counts to buckets so that the shapes repeat. Each figure is this process's RSS (/proc/self/statm) minus the
runtime's (Python, PyTorch with its compiler, routed, before any weight), in GB.

    python benchmarks/memory_growth.py --model checkpoints/small [--quant int8] [--lengths 16:512] [--prompts 40]
"""

from __future__ import annotations

import argparse
import json
import random
import resource

import torch

from routed.bench import _prefill, _rss_bytes, runtime_rss_bytes
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.progress import progress_bar
from routed.quant.linear import model_bytes
from routed.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", choices=["int8", "int4"])
    ap.add_argument("--lengths", default="512", help="a prompt length, or LO:HI to draw each prompt's from")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lo, _, hi = args.lengths.partition(":")
    lo, hi = int(lo), int(hi or lo)
    runtime = runtime_rss_bytes() or 0
    gb = lambda: round(((_rss_bytes() or 0) - runtime) / 1e9, 3)  # noqa: E731
    out: dict = {"model": args.model, "quant": args.quant, "lengths": [lo, hi], "runtime_gb": round(runtime / 1e9, 3)}
    model = load_model(args.model, quant=args.quant, progress=False, routing_telemetry=False)
    out["weights_gb"], out["after_load_gb"] = round(model_bytes(model) / 1e9, 3), gb()
    engine = LLMEngine(model, Tokenizer.from_pretrained(args.model),
                       EngineConfig(max_num_seqs=1, max_num_batched_tokens=hi, kv_cache_gb=0.5,
                                    enable_prefix_caching=False, routing_telemetry=False))
    cache = engine.runner.cache
    out["cache_gb"], out["after_engine_gb"] = round(cache.numel() * cache.element_size() / 1e9, 3), gb()
    rng, after = random.Random(0), []
    with progress_bar("prefills", total=args.prompts) as advance:
        for _ in range(args.prompts):
            _prefill(engine, rng.randint(lo, hi), rng)
            after.append(gb())
            advance()
    out["after_each_prefill_gb"] = after
    out["growth_over_prefills_gb"] = round(after[-1] - out["after_engine_gb"], 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["peak_over_weights_and_cache"] = round((peak - runtime) / 1e9 / (out["weights_gb"] + out["cache_gb"]), 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
