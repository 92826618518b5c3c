"""A/B of a code change in one process: functions as a git revision has them against the working tree's,
interleaved, on prefill (default) or on decode at a batch size (`--decode-batch B`).

This VM's timings drift 2-5x between processes minutes apart, so a speed change is measured here by swapping
the changed functions in and out of one loaded engine and alternating: a prefill (or B sequences decoding
--gen-len tokens) with the revision's code, then with the working tree's, the other way round in the next round
(a fixed order favours one side), and so on; figures are medians over the rounds, with the ratio of the
medians and the median of each round's ratio. Eager paths only: the compiled one-token step keeps what it traced.

    python benchmarks/code_ab.py --model checkpoints/small --base HEAD~1 --rounds 8 \
        --swap routed/model/attention.py:expand_keys,attend_expanded,paged_attention \
        --swap routed/model/experts.py:RoutedExperts._grouped
    python benchmarks/code_ab.py --model checkpoints/small --base HEAD~1 --decode-batch 16 \
        --swap routed/model/attention.py:paged_attention,absorbed_attention

Each --swap names a file and its functions (a method as Class.method); the revision's versions are compiled
from `git show BASE:FILE` into a copy of the live module's namespace (so they call each other's old versions,
and everything else as it is now). A module-level function is rebound wherever it was imported by name.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import random
import statistics
import subprocess
import sys
from types import ModuleType

import torch

from routed.bench import _decode, _prefill
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.progress import progress_bar
from routed.tokenizer import Tokenizer


def old_functions(base: str, path: str, names: list[str]) -> tuple[ModuleType, dict[str, object], dict[str, object]]:
    """(live module, {name: base version}, {name: live version}) for `names` in `path`."""
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    source = subprocess.run(["git", "show", f"{base}:{path}"], check=True, capture_output=True, text=True).stdout
    tree, namespace = ast.parse(source), dict(vars(module))
    old, new = {}, {}
    for name in names:
        cls, _, func = name.rpartition(".")
        body = (next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body if cls else tree.body)
        node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == func)
        exec(compile(ast.Module([node], []), f"{base}:{path}", "exec"), namespace)  # noqa: S102 — our own repo
        old[name] = namespace[func]
        new[name] = getattr(getattr(module, cls), func) if cls else getattr(module, func)
    return module, old, new


def install(module: ModuleType, functions: dict[str, object]) -> None:
    for name, fn in functions.items():
        cls, _, func = name.rpartition(".")
        if cls:
            setattr(getattr(module, cls), func, fn)
            continue
        for other in list(sys.modules.values()):  # `from module import func` copies
            if getattr(other, "__name__", "").startswith("routed") and getattr(other, func, None) is not None:
                if other is module or getattr(getattr(other, func), "__module__", None) == module.__name__:
                    setattr(other, func, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--base", default="HEAD~1", help="git revision whose functions are the A side")
    ap.add_argument("--swap", action="append", required=True, help="FILE:func,Class.method,... (repeatable)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, help="time decode of this many sequences instead of prefill")
    ap.add_argument("--gen-len", type=int, default=16, help="decode: tokens per sequence and round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", choices=("int8", "int4"), help="quantize the model at load")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sides: dict[str, list[tuple[ModuleType, dict[str, object]]]] = {"base": [], "working tree": []}
    for spec in args.swap:
        path, _, names = spec.partition(":")
        try:
            module, old, new = old_functions(args.base, path, names.split(","))
        except ModuleNotFoundError:
            ap.error(f"--swap {spec}: {path} is not a module of this checkout (FILE:func,Class.method)")
        except subprocess.CalledProcessError as e:
            ap.error(f"--swap {spec}: git show {args.base}:{path} failed: {e.stderr.strip()}")
        except (StopIteration, AttributeError):
            ap.error(f"--swap {spec}: not every one of {names!r} is in both {args.base} and the working tree")
        sides["base"].append((module, old))
        sides["working tree"].append((module, new))
    model = load_model(args.model, "bf16", progress=False, quant=args.quant, routing_telemetry=False)
    engine = LLMEngine(model, Tokenizer.from_pretrained(args.model),
                       EngineConfig(routing_telemetry=False, enable_prefix_caching=False,
                                    max_num_seqs=max(16, args.decode_batch or 0),
                                    max_num_batched_tokens=max(args.prompt_len, 16 * (args.decode_batch or 0))))
    rng = random.Random(0)

    def run() -> float:
        if args.decode_batch:
            return _decode(engine, args.decode_batch, args.gen_len, rng)
        return _prefill(engine, args.prompt_len, rng)

    rates: dict[str, list[float]] = {side: [] for side in sides}
    what = f"decode b{args.decode_batch}" if args.decode_batch else f"prefill {args.prompt_len}"
    with torch.inference_mode(), progress_bar(f"{what} A/B", total=args.warmup + 2 * args.rounds) as advance:
        for _ in range(args.warmup):
            run()
            advance()
        for r in range(args.rounds):  # in reverse order every other round: no side always runs first
            for side, swaps in (reversed(sides.items()) if r % 2 else sides.items()):
                for module, functions in swaps:
                    install(module, functions)
                rates[side].append(run())
                advance()
    med = {side: statistics.median(v) for side, v in rates.items()}
    print(json.dumps({"base": args.base, "run": what, "threads": args.threads,
                      "tok_s_median": {k: round(v, 1) for k, v in med.items()},
                      "all": {k: " ".join(str(round(x)) for x in v) for k, v in rates.items()},
                      "ratio": round(med["working tree"] / med["base"], 3),
                      "ratio_per_round_median": round(statistics.median(
                          w / b for w, b in zip(rates["working tree"], rates["base"])), 3)}, indent=2))


if __name__ == "__main__":
    main()
