"""Measure routed on this machine, calibrate `routed plan` on one shape, and check its predictions on the others.

    python benchmarks/plan_calibration.py                          # measure tiny, small, medium; fit on small
    python benchmarks/plan_calibration.py --report-only --out DIR  # reuse DIR/bench_*.json from an earlier run

For each preset: write a random checkpoint (routed.presets.write_random_checkpoint) into a temporary folder,
load it with `routed.LLM(path, dtype="bf16")` and time

* decode at batch 1 and 4: prompts of 64 random tokens, 33 new tokens each (greedy, ignore_eos); the rate is
  the 32 decode steps' tokens over `decode_seconds` (the prefill step is excluded), at an average context of
  64 + 16 = 80 tokens;
* prefill of 256 tokens at batch 1: 256 / `prefill_seconds` (one engine step: the whole prompt plus sampling).

Each figure is the median of `--repeats` runs (default 3) after one warm-up; prefix caching is off so no run
reuses another's prompt. Results go to DIR/bench_<preset>.json in the `routed bench --json` schema that
`routed plan --calibrate` reads. Then the planner is fitted on `--calibrate-on` (default small) with
`--hardware local` (this machine, probed) and the predictions for every shape are printed next to the
measurements as a Markdown table, with the % error.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routed.config import EngineConfig  # noqa: E402
from routed.llm import LLM  # noqa: E402
from routed.presets import PRESETS, write_random_checkpoint  # noqa: E402
from routed.sampling import SamplingParams  # noqa: E402

PROMPT_LEN = 64
NEW_TOKENS = 33  # 1 from the prefill step + 32 decode steps
PREFILL_LEN = 256
DECODE_BATCHES = (1, 4)


def _prompts(rng: random.Random, batch: int, length: int, vocab: int) -> list[list[int]]:
    # ids away from the special tokens at both ends of the DeepSeek vocabulary
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(batch)]


def measure(path: Path, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """Decode (batch 1, 4) and prefill (256 tokens) rates of one checkpoint, medians of `repeats` runs."""
    engine = EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, kv_cache_gb=0.5, enable_prefix_caching=False)
    llm = LLM(path, dtype="bf16", engine_config=engine, progress=False)
    vocab = llm.model.config.vocab_size
    rng = random.Random(seed)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate_ids(_prompts(rng, 4, PROMPT_LEN, vocab), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    runs: list[dict[str, Any]] = []
    for batch in DECODE_BATCHES:
        rates = []
        for _ in range(repeats):
            stats = llm.generate_ids(_prompts(rng, batch, PROMPT_LEN, vocab), greedy)
            decode_tokens = stats.completion_tokens - batch  # each request's first token came from the prefill
            rates.append(decode_tokens / stats.decode_seconds)
        runs.append({"kind": "decode", "batch": batch, "context": PROMPT_LEN + (NEW_TOKENS - 1) // 2,
                     "tokens_per_second": round(statistics.median(rates), 3),
                     "samples": [round(r, 3) for r in rates]})
    rates = []
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for _ in range(repeats):
        stats = llm.generate_ids(_prompts(rng, 1, PREFILL_LEN, vocab), one)
        rates.append(PREFILL_LEN / stats.prefill_seconds)
    runs.append({"kind": "prefill", "batch": 1, "prompt_len": PREFILL_LEN,
                 "tokens_per_second": round(statistics.median(rates), 3), "samples": [round(r, 3) for r in rates]})
    return runs


def bench_preset(preset: str, out: Path, repeats: int, workdir: Path) -> Path:
    t0 = time.perf_counter()
    folder = write_random_checkpoint(preset, workdir / preset)
    written = time.perf_counter() - t0
    runs = measure(folder, repeats)
    result = {
        "model": {"preset": preset, "config": json.loads((folder / "config.json").read_text())},
        "dtype": "bf16",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "runs": runs,
    }
    file = out / f"bench_{preset}.json"
    file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{preset}: checkpoint written in {written:.0f}s, measured in {time.perf_counter() - t0 - written:.0f}s "
          f"-> {file}", file=sys.stderr)
    for run in runs:
        print(f"  {run}", file=sys.stderr)
    return file


def report(files: dict[str, Path], calibrate_on: str, hardware: str) -> str:
    """Fit on one preset's bench file, predict every preset's runs; a Markdown table."""
    from routed.planner.calibrate import calibrate, load_bench
    from routed.planner.hardware import get_hardware

    hw = get_hardware(hardware)
    fit = calibrate([load_bench(files[calibrate_on])], hw)
    lines = [
        f"Hardware `{hardware}`: {hw.describe()}",
        f"Fitted on `{calibrate_on}`: {fit.efficiency.describe()} (RMS log error {fit.rms_log_error:.3f})",
        "",
        "| shape | run | measured tok/s | predicted tok/s | error |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    for preset, file in files.items():
        check = fit.predict(load_bench(file), hw)
        for row in check:
            err = row.predicted / row.measured - 1
            if preset != calibrate_on:
                worst = max(worst, abs(err))
            tag = " (fit)" if preset == calibrate_on else ""
            lines.append(f"| {preset}{tag} | {row.label} | {row.measured:.1f} | {row.predicted:.1f} | {err:+.1%} |")
    lines.append("")
    lines.append(f"Largest error on the shapes not fitted: {worst:.1%}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small,medium", help="comma-separated presets to measure")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "routed_plan_calibration",
                        help="folder for the bench_<preset>.json files")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is kept (default 3)")
    parser.add_argument("--calibrate-on", default="small", help="preset whose bench file the planner is fitted on")
    parser.add_argument("--hardware", default="local", help="planner hardware for the fit (default: local)")
    parser.add_argument("--report-only", action="store_true", help="do not measure; use the files already in --out")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    if args.calibrate_on not in presets:
        parser.error(f"--calibrate-on {args.calibrate_on!r} is not among --presets")
    args.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for preset in presets:
        file = args.out / f"bench_{preset}.json"
        if not args.report_only:
            with tempfile.TemporaryDirectory(prefix=f"routed_{preset}_") as tmp:
                file = bench_preset(preset, args.out, args.repeats, Path(tmp))
        elif not file.exists():
            parser.error(f"{file} does not exist; run without --report-only first")
        files[preset] = file
    print(report(files, args.calibrate_on, args.hardware))
    return 0


if __name__ == "__main__":
    sys.exit(main())
