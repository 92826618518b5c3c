"""A MoE layer's experts for a step of N tokens: routed's fused kernel (`RoutedExperts._fused`, each chosen expert
read once for its tokens) against the grouped path (`_grouped`: `F.grouped_mm`, or per expert in fp32 where the
CPU has no native bf16 products), over every MoE layer of a loaded model, one process, alternating.

Uniform random routing (each token's top-k a random permutation's first k). What `experts.FUSED_MAX_TOKENS` is
chosen from.

    python benchmarks/experts_fused.py --model checkpoints/small --quant int4 --tokens 16,64,256,512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from routed.errors import RoutedError, run_script
from routed.loader import load_model
from routed.model.experts import RoutedExperts
from routed.progress import progress_bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", choices=("bf16", "int8", "int4"), default="bf16")
    ap.add_argument("--tokens", default="16,64,256,512", help="token counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.tokens.split(",")]
    model = load_model(args.model, "bf16", quant=None if args.quant == "bf16" else args.quant, progress=True,
                       routing_telemetry=False)
    layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    if not layers or not layers[0].fused:
        raise RoutedError("the fused experts do not run here (they need routed's kernels: an AVX2 CPU and a C++ "
                          "compiler)")
    E, K, D = layers[0].num_experts, model.config.num_experts_per_tok, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    print(f"{args.model} {args.quant}, {len(layers)} MoE layers, {args.threads} threads, median of {args.repeats}")
    with torch.inference_mode(), progress_bar("experts", total=len(counts) * args.repeats) as advance:
        for n in counts:
            x = torch.randn(n, D, generator=g).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
            w = torch.rand(n, K, generator=g)
            per_expert = torch.bincount(ids.flatten(), minlength=E)
            ms: dict[str, list[float]] = {"fused": [], "grouped": []}
            for r in range(args.repeats):
                for name in ("fused", "grouped") if r % 2 == 0 else ("grouped", "fused"):
                    start = time.perf_counter()
                    for m in layers:
                        m._fused(x, ids, w) if name == "fused" else m._grouped(x, ids, w, per_expert)
                    ms[name].append((time.perf_counter() - start) * 1e3)
                advance()
            f, gr = statistics.median(ms["fused"]), statistics.median(ms["grouped"])
            print(f"{n:5d} tokens: fused {f:8.1f} ms, grouped {gr:8.1f} ms, grouped / fused {gr / f:.2f}x")


if __name__ == "__main__":
    run_script(main)
