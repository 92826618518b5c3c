"""How a decode step at batch 1 divides: the time in routed's weight kernels against everything else.

One model is loaded and its one-token step compiled; then rounds of greedy decoding alternate between the step as
it is and the same step with routed's weight kernels (`routed::bf16_dot`, `int8_dot`, `int4_dot` and the
one-call experts: every product with the model's weights, the lm_head included) swapped, through the dispatcher,
for ones that return zeros at once. The second rate is what the step costs without reading a weight: the
compiled graph's other kernels, its wrapper, the router, attention over the cache, the engine and sampling.
The difference is the kernels' time, and the weight bytes a step reads (`routed.bench.bytes_per_decode_step`) over
it the rate they read at — beside `torch.sum` over a buffer of as many bytes in fp32 (this machine's read rate,
measured in each round).

This measures the compiled step (`compile_decode(allow_native=False)`): the native layers (`routed.model.native`,
the default one-token step where routed's kernels run) call the kernels without the dispatcher, so there is nothing
to swap; `benchmarks/native_decode_ab.py` compares the two. Needs routed's kernels (AVX2 CPUs); a stand-in kernel is called through Python from the compiled graph, so
"without the kernels" slightly over-counts the rest (a few microseconds per call, ~60 calls a step).

    python benchmarks/decode_split.py --model checkpoints/small --quant bf16 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings

import torch

from routed.bench import _decode, bytes_per_decode_step
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.errors import RoutedError
from routed.loader import load_model
from routed.progress import progress_bar
from routed.quant import kernels
from routed.tokenizer import Tokenizer

OPS = ("bf16_dot", "int8_dot", "int4_dot", "bf16_experts", "int8_experts", "int4_experts")


def _zeros_like_out(op: str):
    if op.endswith("_experts"):  # a layer's routed experts: fp32 [tokens, D]
        return lambda x, ids, weights, *w: torch.zeros(x.shape, dtype=torch.float32)
    if op == "int4_dot":
        return lambda x, packed, scales_zeros, group: x.new_zeros(*x.shape[:-1], packed.shape[0])
    return lambda x, w, *scale: x.new_zeros(*x.shape[:-1], w.shape[0])


class WithoutKernels:
    """Within the block, routed's weight kernels return zeros without reading their weights."""

    def __enter__(self) -> None:
        self.lib = torch.library.Library("routed", "IMPL")
        with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore", UserWarning)
            for op in OPS:
                self.lib.impl(op, _zeros_like_out(op), "CPU")

    def __exit__(self, *exc) -> None:
        self.lib._destroy()


def read_rate(nbytes: int, repeats: int = 3) -> float:
    """GB/s of a plain fp32 torch.sum over nbytes, best of `repeats`."""
    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def split(path: str, quant: str, rounds: int, gen: int) -> dict:
    if not kernels.int_dot():
        raise RoutedError("routed's kernels are not built here (they need an AVX2 CPU and a C++ compiler)")
    model = load_model(path, "bf16", quant=None if quant == "bf16" else quant, progress=True,
                       routing_telemetry=False)
    model.compile_decode(progress=True, allow_native=False)  # the compiled step, whose kernels can be swapped
    engine = LLMEngine(model, Tokenizer.from_pretrained(path),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    rng = random.Random(0)
    _decode(engine, 1, 4, rng)  # compiles the step
    step_bytes = bytes_per_decode_step(model, 1)
    ms: dict[str, list[float]] = {"step": [], "without_kernels": []}
    rates: list[float] = []
    with progress_bar(f"{quant} decode split", total=rounds) as advance:
        for r in range(rounds):
            for name in (("step", "without_kernels") if r % 2 == 0 else ("without_kernels", "step")):
                if name == "step":
                    ms[name].append(1e3 / _decode(engine, 1, gen, rng))
                else:
                    with WithoutKernels():
                        ms[name].append(1e3 / _decode(engine, 1, gen, rng))
            rates.append(read_rate(step_bytes))
            advance()
    step, rest = statistics.median(ms["step"]), statistics.median(ms["without_kernels"])
    kernels_ms = statistics.median(a - b for a, b in zip(ms["step"], ms["without_kernels"]))
    return {"quant": quant, "rounds": rounds, "gen_len": gen, "threads": torch.get_num_threads(),
            "step_ms": round(step, 2), "without_kernels_ms": round(rest, 2), "kernels_ms": round(kernels_ms, 2),
            "weight_bytes_per_step": step_bytes,
            "kernels_read_gbs": round(step_bytes / kernels_ms / 1e6, 2),
            "torch_sum_read_gbs": round(statistics.median(rates), 2),
            "tok_s": round(1e3 / step, 2), "tok_s_if_only_kernels": round(1e3 / kernels_ms, 2)}


def cli(doc: str, run) -> None:
    """The command line this script and `native_decode_ab.py` share: run(model, quant, rounds, gen_len) -> a dict,
    printed as JSON."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", choices=("bf16", "int8", "int4"), default="bf16")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=32, help="tokens per round")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(json.dumps(run(args.model, args.quant, args.rounds, args.gen_len), indent=1))
    except RoutedError as e:
        raise SystemExit(f"error: {e}") from None


def main() -> None:
    cli(__doc__, split)


if __name__ == "__main__":
    main()
