"""Decode at batch 1: the native one-token layers (`routed.model.native`) against the compiled step, one process.

One model is loaded; `compile_decode(allow_native=False)` compiles the graph the step used before the native
layers, then rounds of greedy decoding alternate between the two (the native layers set on the model, or not),
so a noisy minute hits both alike. Medians over the rounds and the median of each round's own ratio.

    python benchmarks/native_decode_ab.py --model checkpoints/small --quant int4 --rounds 8
"""

from __future__ import annotations

import random
import statistics

import torch

from decode_split import cli  # benchmarks/decode_split.py
from routed.bench import _decode
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.errors import RoutedError
from routed.loader import load_model
from routed.progress import progress_bar
from routed.tokenizer import Tokenizer


def ab(path: str, quant: str, rounds: int, gen: int) -> dict:
    model = load_model(path, "bf16", quant=None if quant == "bf16" else quant, progress=True,
                       routing_telemetry=False)
    layers = model._native
    if layers is None:
        raise RoutedError("the native layers do not run here (they need routed's kernels: an AVX2 CPU and a C++ "
                          "compiler, and bf16 activations)")
    model.compile_decode(progress=True, allow_native=False)
    engine = LLMEngine(model, Tokenizer.from_pretrained(path),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    rng = random.Random(0)
    tok_s: dict[str, list[float]] = {"native": [], "compiled": []}
    for name in tok_s:  # warm-up
        model._native = layers if name == "native" else None
        _decode(engine, 1, 8, rng)
    with progress_bar(f"{quant} native vs compiled", total=rounds) as advance:
        for r in range(rounds):
            for name in (("native", "compiled") if r % 2 == 0 else ("compiled", "native")):
                model._native = layers if name == "native" else None
                tok_s[name].append(_decode(engine, 1, gen, rng))
            advance()
    return {"quant": quant, "rounds": rounds, "gen_len": gen, "threads": torch.get_num_threads(),
            "native_tok_s": round(statistics.median(tok_s["native"]), 2),
            "compiled_tok_s": round(statistics.median(tok_s["compiled"]), 2),
            "ratio_of_medians": round(statistics.median(tok_s["native"]) / statistics.median(tok_s["compiled"]), 3),
            "median_round_ratio": round(statistics.median(n / c for n, c in zip(tok_s["native"], tok_s["compiled"])),
                                        3)}


def main() -> None:
    cli(__doc__, ab)


if __name__ == "__main__":
    main()
