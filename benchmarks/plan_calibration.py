"""Measure routed on this machine, calibrate `routed plan` on one shape, and check its predictions on the others.

    python benchmarks/plan_calibration.py                          # measure tiny, small, medium; fit on small
    python benchmarks/plan_calibration.py --report-only --out DIR  # reuse DIR/bench_*.json from an earlier run

For each preset: write a random checkpoint (routed.presets.write_random_checkpoint) into a temporary folder,
load it with `routed.LLM(path, dtype="bf16")` and time

* decode at batch 1, 2, 4, 8 and 16: prompts of 64 random tokens, 33 new tokens each (greedy, ignore_eos);
  the rate is the 32 decode steps' tokens over `decode_seconds` (the prefill step is excluded), at an average
  context of 64 + 16 = 80 tokens;
* prefill of 64 and 256 tokens at batch 1: tokens / `prefill_seconds` (one engine step: the whole prompt
  plus sampling).

Batches 1 and 4 and the 256-token prefill are the figures quoted; the others give the fit on one shape
enough leverage to tell per-op overhead (grows with sequences) from memory time (grows with the distinct
experts read, which saturates).

Each figure is the median of `--repeats` runs (default 3) after one warm-up; prefix caching and routing
telemetry are off (as `routed bench` runs the engine) and no run reuses another's prompt. The machine may be
shared, so every repeat (and the `local` hardware probe, re-run before each shape and cached for
`routed plan --hardware local`) is checked against /proc: if other processes used more of the CPUs than
--max-foreign while it ran (default: the share of the cores torch's threads leave free, + 2%), it is run
again — up to --tries times, each after waiting idle for a quiet second (within a total of --patience
seconds), keeping the least disturbed. The other processes' share is recorded next to each sample
(`foreign_cpu`): a neighbour on the other core still slows a single-threaded run (shared caches and memory
bandwidth, possibly one physical core under the VM), so quote figures taken with `--max-foreign 0.05`.

Results go to DIR/bench_<preset>.json in the `routed bench --json` schema that `routed plan --calibrate`
reads. Then the planner is fitted on `--calibrate-on` (default small) with `--hardware local` (the probe
taken before that shape's runs) and the predictions for every shape are printed next to the measurements as
a Markdown table, with the % error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routed.config import EngineConfig  # noqa: E402
from routed.llm import LLM  # noqa: E402
from routed.presets import PRESETS, write_random_checkpoint  # noqa: E402
from routed.sampling import SamplingParams  # noqa: E402

PROMPT_LEN = 64
NEW_TOKENS = 33  # 1 from the prefill step + 32 decode steps
PREFILL_LENS = (64, 256)
DECODE_BATCHES = (1, 2, 4, 8, 16)


def _jiffies() -> tuple[int, int, int]:
    """(busy, total) CPU jiffies of the machine and this process's own (all threads), from /proc."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])
    busy = total - fields[3] - fields[4]  # minus idle and iowait
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, total, int(stat[11]) + int(stat[12])  # utime + stime


def foreign_share(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run fn; -> (its result, the share of all CPU time that other processes used meanwhile)."""
    busy0, total0, mine0 = _jiffies()
    result = fn()
    busy1, total1, mine1 = _jiffies()
    return result, max(0, (busy1 - busy0) - (mine1 - mine0)) / max(total1 - total0, 1)


MAX_FOREIGN: float | None = None  # --max-foreign
TRIES = 10  # --tries


def undisturbed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run fn until other processes left it the cores it uses (the machine is shared: a neighbour taking a
    core that torch's threads are on stalls every op); after TRIES, keep the least disturbed run."""
    cores = os.cpu_count() or 1
    limit = MAX_FOREIGN if MAX_FOREIGN is not None else max(0.05, (cores - torch.get_num_threads()) / cores + 0.02)
    best: tuple[Any, float] | None = None
    for _ in range(TRIES):
        while foreign_share(lambda: time.sleep(1.0))[1] >= limit and time.monotonic() < _deadline():
            pass  # wait, without running anything, for the neighbours to calm down
        result, share = foreign_share(fn)
        if best is None or share < best[1]:
            best = (result, share)
        if share < limit:
            break
    assert best is not None
    return best


_START = time.monotonic()
PATIENCE_S = 600.0  # --patience: total seconds the whole run may spend waiting for a quiet machine


def _deadline() -> float:
    return _START + PATIENCE_S


def _prompts(rng: random.Random, batch: int, length: int, vocab: int) -> list[list[int]]:
    # ids away from the special tokens at both ends of the DeepSeek vocabulary
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(batch)]


class ExpertCounter:
    """Distinct routed experts each MoE layer ran, per forward call (hooks; attached only to untimed runs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.by_tokens: dict[int, list[int]] = {}
        self.model = model
        self.handles: list[Any] = []

    def __enter__(self) -> ExpertCounter:
        from routed.model.experts import RoutedExperts

        def hook(_module: Any, inputs: Any, output: Any) -> None:
            tokens = inputs[0].shape[0]
            self.by_tokens.setdefault(tokens, []).append(int((output[1] > 0).sum()))

        self.handles = [m.register_forward_hook(hook) for m in self.model.modules() if isinstance(m, RoutedExperts)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def mean(self, tokens: int) -> float | None:
        seen = self.by_tokens.get(tokens)
        return round(sum(seen) / len(seen), 3) if seen else None


def measure(path: Path, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """Decode (batch 1-16) and prefill (64, 256 tokens) rates of one checkpoint, medians of `repeats` runs.

    After the timed repeats of each kind, one more untimed run with hooks counts the distinct experts each
    MoE layer ran per step: the random router is far from uniform, and the planner can use the measurement.
    """
    # as `routed bench` runs the engine: no prefix caching, no routing telemetry
    engine = EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, kv_cache_gb=0.5, enable_prefix_caching=False,
                          routing_telemetry=False)
    llm = LLM(path, dtype="bf16", engine_config=engine, progress=False)
    vocab = llm.model.config.vocab_size
    rng = random.Random(seed)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate_ids(_prompts(rng, 4, PROMPT_LEN, vocab), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    runs: list[dict[str, Any]] = []
    for batch in DECODE_BATCHES:
        rates, shares = [], []
        for _ in range(repeats):
            prompts = _prompts(rng, batch, PROMPT_LEN, vocab)
            stats, share = undisturbed(lambda: llm.generate_ids(prompts, greedy))
            decode_tokens = stats.completion_tokens - batch  # each request's first token came from the prefill
            rates.append(decode_tokens / stats.decode_seconds)
            shares.append(share)
        with ExpertCounter(llm.model) as counter:
            llm.generate_ids(_prompts(rng, batch, PROMPT_LEN, vocab), greedy)
        runs.append({"kind": "decode", "batch": batch, "context": PROMPT_LEN + (NEW_TOKENS - 1) // 2,
                     "tokens_per_second": round(statistics.median(rates), 3), "experts_touched": counter.mean(batch),
                     "samples": [round(r, 3) for r in rates], "foreign_cpu": [round(x, 3) for x in shares]})
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for length in PREFILL_LENS:
        rates, shares = [], []
        for _ in range(repeats):
            prompt = _prompts(rng, 1, length, vocab)
            stats, share = undisturbed(lambda: llm.generate_ids(prompt, one))
            rates.append(length / stats.prefill_seconds)
            shares.append(share)
        with ExpertCounter(llm.model) as counter:
            llm.generate_ids(_prompts(rng, 1, length, vocab), one)
        runs.append({"kind": "prefill", "batch": 1, "prompt_len": length,
                     "tokens_per_second": round(statistics.median(rates), 3),
                     "experts_touched": counter.mean(length), "samples": [round(r, 3) for r in rates],
                     "foreign_cpu": [round(x, 3) for x in shares]})
    return runs


def bench_preset(preset: str, out: Path, repeats: int, workdir: Path) -> Path:
    from routed.planner.hardware import local_hardware

    t0 = time.perf_counter()
    folder = write_random_checkpoint(preset, workdir / preset)
    written = time.perf_counter() - t0
    # probe under the same conditions as the runs (and cache it for `routed plan --hardware local`)
    hw, probe_share = undisturbed(lambda: local_hardware(remeasure=True))
    runs = measure(folder, repeats)
    result = {
        "model": {"preset": preset, "config": json.loads((folder / "config.json").read_text())},
        "dtype": "bf16",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "probe_foreign_cpu": round(probe_share, 3),
        "local_hardware": hw.to_dict(),
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
    from routed.planner.hardware import get_hardware, hardware_from_dict, local_hardware

    benches = {preset: load_bench(file) for preset, file in files.items()}
    recorded = json.loads(files[calibrate_on].read_text()).get("local_hardware")
    if hardware == "local" and recorded:  # the probe taken just before the fitted shape's runs
        hw = hardware_from_dict(recorded, str(files[calibrate_on]))
    elif hardware == "local":
        hw = local_hardware(threads=benches[calibrate_on].threads)
    else:
        hw = get_hardware(hardware)
    fit = calibrate([benches[calibrate_on]], hw)
    lines = [
        f"Hardware `{hardware}`: {hw.describe()}",
        f"Fitted on `{calibrate_on}`: {fit.efficiency.describe()} (RMS log error {fit.rms_log_error:.3f})",
        "",
        "| shape | run | measured tok/s | predicted tok/s | error |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    for preset in files:
        check = fit.predict(benches[preset], hw)
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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the runs and the probe (default: torch's own choice)")
    parser.add_argument("--max-foreign", type=float, default=None, metavar="SHARE",
                        help="rerun a repeat when other processes used more than this share of all CPUs meanwhile "
                             "(default: the share of the cores torch's threads leave free, + 0.02)")
    parser.add_argument("--tries", type=int, default=10,
                        help="attempts per repeat before keeping the least disturbed (default 10)")
    parser.add_argument("--patience", type=float, default=600.0, metavar="SECONDS",
                        help="seconds the whole run may spend waiting for quiet before each attempt (default 600)")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    global MAX_FOREIGN, TRIES, PATIENCE_S
    MAX_FOREIGN, TRIES, PATIENCE_S = args.max_foreign, max(args.tries, 1), args.patience
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
