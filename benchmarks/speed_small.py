"""The speed issue's table in one script: transformers bf16 against routed bf16, int8 and int4 on one checkpoint.

All four models are loaded in this one process and timed in turn within each repeat (so a noisy minute hits
every engine alike); figures are medians over the repeats; ratios are to transformers bf16 in the same run, both
as the ratio of medians and as the median of each repeat's own ratio (figures timed seconds apart).

    python benchmarks/speed_small.py --model checkpoints/small --threads 2 --repeats 5 --out benchmarks/results/speed_small.json

Prefill: one prompt of --prompt-len random ids, last position's logits (transformers: `logits_to_keep=1`,
as its generate() does). Decode: --gen-len greedy tokens after a 16-token prompt, batch 1 for every engine,
batches 8 and 16 for routed bf16.

With `--llama-bench BIN --gguf NAME=FILE ...` llama.cpp joins the same repeats: each GGUF is timed by its own
`llama-bench` process (pp --prompt-len, then tg --gen-len, batch 1, --threads) between the Python engines'
figures, so its ratios to transformers come from the same minutes as routed's. `benchmarks/llama_cpp.sh` builds
llama-bench from the llama.cpp sources on PyPI (the llama-cpp-python sdist) and converts the checkpoint to GGUF
(bf16, Q8_0, Q4_K_M):

    benchmarks/llama_cpp.sh checkpoints/small /tmp/llama
    python benchmarks/speed_small.py --model checkpoints/small --threads 2 --repeats 3 \
        --llama-bench /tmp/llama/build/bin/llama-bench --gguf bf16=/tmp/llama/small-bf16.gguf \
        --gguf q8_0=/tmp/llama/small-q8_0.gguf --gguf q4_k_m=/tmp/llama/small-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

from routed.bench import _decode, _prefill
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.progress import progress_bar
from routed.tokenizer import Tokenizer


def transformers_runner(path: str, prompt_len: int, gen_len: int):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def prefill() -> float:
        ids = torch.randint(1000, vocab - 1, (1, prompt_len), generator=g)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        return prompt_len / (time.perf_counter() - start)

    def decode() -> float:  # generate's own prefill of the 16-token prompt subtracted
        ids = torch.randint(1000, vocab - 1, (1, 16), generator=g)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
        return (gen_len - 1) / (time.perf_counter() - start - first)

    return prefill, decode


def llama_cpp_runner(binary: str, gguf: str, threads: int, prompt_len: int, gen_len: int):
    """(prefill, decode) tok/s functions, each one llama-bench process on the GGUF (its own warm-up run first)."""

    def run(*test: str) -> float:
        cmd = [binary, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *test]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        return float(json.loads(done.stdout)[0]["avg_ts"])

    return (lambda: run("-p", str(prompt_len), "-n", "0")), (lambda: run("-p", "0", "-n", str(gen_len)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary: time the --gguf files beside the rest")
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE",
                    help="a GGUF of the same checkpoint for --llama-bench (repeatable), e.g. q8_0=small-q8_0.gguf")
    args = ap.parse_args()
    ggufs = dict(g.partition("=")[::2] for g in args.gguf)
    if bool(args.llama_bench) != bool(ggufs) or not all(ggufs.values()):
        ap.error("--llama-bench and --gguf NAME=FILE go together")
    for f in [args.llama_bench, *ggufs.values()] if ggufs else []:
        if not Path(f).is_file():
            ap.error(f"no such file: {f}")
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    figures: dict[str, list[float]] = {}
    tasks: list[tuple[str, object]] = []
    with torch.inference_mode():
        hf_prefill, hf_decode = transformers_runner(args.model, args.prompt_len, args.gen_len)
        hf_prefill(), hf_decode()  # warm-up
    tasks += [("transformers bf16 prefill", hf_prefill), ("transformers bf16 decode b1", hf_decode)]
    for name, gguf in ggufs.items():
        prefill, decode = llama_cpp_runner(args.llama_bench, gguf, args.threads, args.prompt_len, args.gen_len)
        tasks += [(f"llama.cpp {name} prefill", prefill), (f"llama.cpp {name} decode b1", decode)]
    tok = Tokenizer.from_pretrained(args.model)
    engines = {}
    for quant in (None, "int8", "int4"):
        name = f"routed {quant or 'bf16'}"
        start = time.perf_counter()
        model = load_model(args.model, "bf16", progress=False, quant=quant, routing_telemetry=False)
        load_s = time.perf_counter() - start
        engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=16, max_num_batched_tokens=args.prompt_len,
                                                    kv_cache_gb=0.5, enable_prefix_caching=False,
                                                    routing_telemetry=False))
        engines[name] = {"load_s": load_s, "compiled_decode": model._one_token_plan is not None,
                         "native_decode": model._native is not None}
        _decode(engine, 1, 4, rng)
        for _ in range(3):
            _prefill(engine, args.prompt_len, rng)
        tasks.append((f"{name} prefill", lambda e=engine: _prefill(e, args.prompt_len, rng)))
        for b in ((1, 8, 16) if quant is None else (1,)):
            tasks.append((f"{name} decode b{b}", lambda e=engine, b=b: _decode(e, b, args.gen_len, rng)))
    with progress_bar("speed", total=args.repeats * len(tasks)) as advance, torch.inference_mode():
        for _ in range(args.repeats):
            for name, task in tasks:
                figures.setdefault(name, []).append(task())  # type: ignore[operator]
                advance()
    med = {k: statistics.median(v) for k, v in figures.items()}

    def baseline(name: str) -> str:  # the transformers figure a routed figure is compared with
        return "transformers bf16 prefill" if name.endswith("prefill") else "transformers bf16 decode b1"

    hf = {"prefill": med["transformers bf16 prefill"], "decode b1": med["transformers bf16 decode b1"]}
    out = {
        "model": args.model, "threads": args.threads, "repeats": args.repeats, "prompt_len": args.prompt_len,
        "gen_len": args.gen_len, "engines": engines,
        "tok_s": {k: round(v, 1) for k, v in med.items()},
        "spread": {k: round(max(v) - min(v), 1) for k, v in figures.items()},
        "repeats_tok_s": {k: " ".join(f"{x:.1f}" for x in v) for k, v in figures.items()},
        "ratio_vs_transformers_bf16": {
            k: round(v / hf["prefill" if k.endswith("prefill") else "decode b1"], 2)
            for k, v in med.items() if not k.startswith("transformers") and k.endswith(("prefill", " b1"))},
        # each repeat's routed figure over the transformers figure timed beside it, then the median: the drift
        # of this shared VM between minutes cancels within a repeat (the ratio of medians above pairs figures
        # from different repeats)
        "ratio_per_repeat_median": {
            k: round(statistics.median(x / y for x, y in zip(v, figures[baseline(k)])), 2)
            for k, v in figures.items() if not k.startswith("transformers") and k.endswith(("prefill", " b1"))},
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
