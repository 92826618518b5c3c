"""Shared by the compiled decode step's A/B scripts (decode_chunk_ab.py and ad hoc ones): their
arguments and model, a second compiled plan of the same model under another setting, and decode at batch 1
through each plan in turn."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from types import ModuleType
from typing import Any

import torch

from routed.bench import _decode
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.errors import RoutedError
from routed.loader import load_model
from routed.progress import progress_bar
from routed.tokenizer import Tokenizer


def setup(description: str) -> tuple[argparse.Namespace, LLMEngine, float]:
    """The scripts' arguments, and an engine on the loaded model (telemetry off); the load's seconds."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", choices=("int8", "int4"))
    ap.add_argument("--gen-len", type=int, default=32, help="tokens per round, after the prompt")
    ap.add_argument("--prompt-len", type=int, default=16, help="tokens of each round's prompt (default 16)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        model = load_model(args.model, "bf16", progress=False, quant=args.quant, routing_telemetry=False)
    except RoutedError as e:
        raise SystemExit(f"error: {e}") from None
    load_s = time.perf_counter() - start
    engine = LLMEngine(model, Tokenizer.from_pretrained(args.model),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False))
    return args, engine, load_s


def plan_with(model: Any, module: ModuleType, name: str, value: Any) -> list:
    """The model's one-token plan compiled afresh (new functions) with `module.name = value` while it is traced;
    the model keeps its current plan and the setting its value."""
    current, saved = model._one_token_plan, getattr(module, name)
    setattr(module, name, value)
    model._decode_fns = {}
    try:
        if not model.compile_decode():
            raise SystemExit("compiling the decode step failed (see the warning above)")
        return model._one_token_plan
    finally:
        setattr(module, name, saved)
        model._one_token_plan = current


def interleaved(engine: LLMEngine, plans: dict[str, list], rounds: int, gen_len: int,
                rng: random.Random, prompt_len: int = 16) -> dict[str, list[float]]:
    """Decode b1 tok/s through each plan, one warm-up each, then `rounds` rounds of every plan in turn — in
    reverse order every other round, so that no plan always runs first (a fixed order read 1.04x for two plans
    that 14 alternating rounds put at 0.99x)."""
    model = engine.model
    rates: dict[str, list[float]] = {name: [] for name in plans}
    with torch.inference_mode(), progress_bar("decode A/B", total=len(plans) * (rounds + 1)) as advance:
        for plan in plans.values():
            model._one_token_plan = plan
            _decode(engine, 1, 8, rng, prompt_len)
            advance()
        for r in range(rounds):
            for name, plan in (reversed(plans.items()) if r % 2 else plans.items()):
                model._one_token_plan = plan
                rates[name].append(_decode(engine, 1, gen_len, rng, prompt_len))
                advance()
    return rates


def compare(args: argparse.Namespace, engine: LLMEngine, before: list, after: list, names: tuple[str, str]) -> None:
    """Decode b1 through two plans, interleaved (`interleaved`), and print the medians and the median of each
    round's ratio after / before as JSON."""
    a, b = names
    rates = interleaved(engine, {a: before, b: after}, args.rounds, args.gen_len, random.Random(0), args.prompt_len)
    print(json.dumps({"quant": args.quant or "bf16", "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                      "threads": args.threads,
                      "decode_b1_tok_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()},
                      "all": {k: " ".join(f"{x:.1f}" for x in v) for k, v in rates.items()},
                      "ratio (median of rounds)": {f"{b} / {a}": round(statistics.median(
                          y / x for x, y in zip(rates[a], rates[b])), 3)}}, indent=2))
