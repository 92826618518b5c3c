"""routed's integer dot-product kernels (`routed/quant/csrc/int_dot.cpp`, AVX2 CPUs) against PyTorch's weight-only
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`, in one process:

* `--shapes`: one-row products of `small`'s shapes with cold weights (copies of the weight cycled through
  ~400 MB of int8 or ~200 MB of int4, so each call reads it from memory), beside an fp32 `torch.sum` over as
  many bytes (the memory's rate);
* `--model`: decode, two copies of the model loaded and compiled in one process — one on PyTorch's kernels (and,
  int8, FBGEMM's 7-bit lm_head), one on routed's — alternating rounds of greedy decoding;
* `--model ... --compare experts`: the same, both on routed's kernels, one running each chosen expert's
  products as kernel calls of their own (two or three per expert), one with a layer's experts in one call
  (`routed::int8_experts` / `int4_experts`).

    python benchmarks/int_dot.py --shapes --quant int8 --threads 2
    python benchmarks/int_dot.py --model checkpoints/small --quant int4 --threads 2 --rounds 8 --batch 1
    python benchmarks/int_dot.py --model checkpoints/small --quant int4 --compare experts --rounds 8
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
from routed.model.experts import RoutedExperts
from routed.progress import progress_bar
from routed.quant import intq, kernels
from routed.tokenizer import Tokenizer

SHAPES = [(512, 1024), (1024, 512), (1536, 1024), (2816, 1024), (1024, 2816), (129280, 1024)]  # small's


def _int8_case(N: int, K: int):
    w, s = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).bfloat16() / 100
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, w, s)), (lambda x: torch.ops.routed.int8_dot(x, w, s))


def _int4_case(N: int, K: int, group: int = 32):
    packed = intq.pack_int4(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8))
    sz = (torch.rand(K // group, N, 2) / 10).bfloat16()
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz),
            lambda x: torch.ops.routed.int4_dot(x, packed, sz, group))


def shapes(quant: str, repeats: int) -> dict:
    assert kernels.int_dot(), "routed's kernels are not available on this machine"
    out = {}
    for N, K in SHAPES:
        nbytes = N * K if quant == "int8" else N * K // 2
        copies = max(1, 400_000_000 // N // K)
        cases = [(_int8_case if quant == "int8" else _int4_case)(N, K) for _ in range(copies)]
        fs = [torch.randn(nbytes // 4) for _ in range(copies)]
        x = torch.randn(1, K).bfloat16()
        torch_name = "_weight_int8pack_mm" if quant == "int8" else "_weight_int4pack_mm_for_cpu"
        paths = {torch_name: lambda i: cases[i][0](x), f"{quant}_dot": lambda i: cases[i][1](x),
                 "fp32 sum": lambda i: fs[i].sum()}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(repeats):
            for name, f in paths.items():
                start = time.perf_counter()
                for i in range(copies):
                    f(i)
                times[name].append((time.perf_counter() - start) / copies)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"{N}x{K}"] = {"us": {k: round(v * 1e6, 1) for k, v in med.items()},
                           "GB_s": {k: round(nbytes / v / 1e9, 2) for k, v in med.items()},
                           "speedup": round(med[torch_name] / med[f"{quant}_dot"], 3)}
        print(f"{N}x{K}: " + "  ".join(f"{k} {v * 1e6:.0f} us ({nbytes / v / 1e9:.1f} GB/s)" for k, v in med.items())
              + f"  -> {out[f'{N}x{K}']['speedup']:.2f}x", flush=True)
    return out


def _use(with_kernel: bool) -> None:
    kernels.WANTED, kernels.INT8_DOT, kernels.INT4_DOT, kernels.BF16_DOT = with_kernel, False, False, False
    kernels.int_dot.cache_clear()
    kernels.int_dot()


class PerExpert(RoutedExperts):
    """Each chosen expert's products as kernel calls of their own (as before the one-call-per-layer ops)."""

    @property
    def fused(self) -> bool:
        return False


def load(path: str, quant: str, with_kernel: bool, per_expert: bool = False):
    _use(with_kernel)
    model = load_model(path, "bf16", quant=None if quant == "bf16" else quant, progress=False, routing_telemetry=False)
    if per_expert:  # before the engine compiles the step
        for m in model.modules():
            if isinstance(m, RoutedExperts):
                m.__class__ = PerExpert
    engine = LLMEngine(model, Tokenizer.from_pretrained(path),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    return engine


def decode_ab(path: str, quant: str, rounds: int, batch: int, gen: int, compare: str = "kernels") -> dict:
    rng = random.Random(0)
    engines = {}
    # (name, routed's kernels, per-expert calls)
    variants = ((("pytorch", False, False), ("routed", True, False)) if compare == "kernels"
                else (("per_expert", True, True), ("per_layer", True, False)))
    for name, flag, per_expert in variants:
        engines[name] = (load(path, quant, flag, per_expert), flag)
        _decode(engines[name][0], batch, 4, rng)  # compiles the step with this kernel choice
    rates: dict[str, list[float]] = {k: [] for k in engines}
    with progress_bar(f"{quant} decode b{batch}", total=2 * rounds) as advance:
        for r in range(rounds):
            for name, (engine, flag) in (engines.items() if r % 2 == 0 else reversed(engines.items())):
                _use(flag)  # eager products (prefill's few rows) follow the model's choice
                rates[name].append(_decode(engine, batch, gen, rng))
                advance()
    base, new = (v[0] for v in variants)
    per_round = [b / a for a, b in zip(rates[base], rates[new])]
    out = {"quant": quant, "batch": batch, "rounds": rounds, "compare": compare,
           "tok_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
           "ratio_of_medians": round(statistics.median(rates[new]) / statistics.median(rates[base]), 3),
           "median_per_round": round(statistics.median(per_round), 3)}
    print(json.dumps(out, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", action="store_true", help="time one-row products of small's shapes, cold")
    ap.add_argument("--model", help="a float checkpoint folder: decode both ways, alternating")
    ap.add_argument("--quant", choices=["int8", "int4", "bf16"], default="int8",
                    help="bf16 (with --model): the float weights, routed's bf16_dot / bf16_experts against inductor's loops")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--compare", choices=["kernels", "experts"], default="kernels",
                    help="with --model: PyTorch's kernels vs routed's, or per-expert calls vs one per layer")
    args = ap.parse_args()
    if not (args.shapes or args.model):
        ap.error("give --shapes, --model PATH, or both")
    torch.set_num_threads(args.threads)
    if args.shapes:
        shapes(args.quant, args.repeats)
    if args.model:
        decode_ab(args.model, args.quant, args.rounds, args.batch, args.gen, args.compare)


if __name__ == "__main__":
    main()
