"""Measure routed with `routed bench` on several shapes, calibrate `routed plan` on one, check the others.

    python benchmarks/plan_calibration.py                  # measure tiny, demo, medium, small; fit on medium
    python benchmarks/plan_calibration.py --report-only    # reuse the bench files already in --out
    python benchmarks/plan_calibration.py --report-only --out benchmarks/results/plan_calibration/eager-720ff02
    python benchmarks/plan_calibration.py --reprobe 3      # re-run the probe for fields the stored files lack

For each shape (a random checkpoint of a routed preset, written once into --checkpoints; `demo` is the trained
model bundled in the package; `small` is ./checkpoints/small when present) this runs, one at a time:

    routed bench --model M --prompt-len 256 --gen-len 32 --batch 1,2,4,8,16,32,64 --repeats R --threads 1 --json
    routed bench --model M --prompt-len 64 --gen-len 2 --batch 1 --repeats R --threads 1 --json

and keeps the first file's runs plus the second's 64-token prefill in DIR/bench_<shape>.json (the `routed bench
--json` schema, with the two commands under `commands`). Two prefill lengths and seven decode batches give a
fit on one shape enough leverage to tell the per-op overhead (grows with layers, sequences and experts run)
from bytes (grows with the distinct experts read, which saturates) and FLOPs (grow with tokens).

The engine: each file records `routed bench`'s `engine` (version, commit, and whether the compiled one-row
GEMV and the compiled one-token decode were in use; both commands must agree). On the current engine `medium`
(0.92 GB) and `small` (2.0 GB) load with both on — their decode at batch 1 is a compiled step, which the
planner models from the probe's one-row read rate, per-block cost and compiled per-score cost — and `tiny`
(68 MB) and the demo model (22 MB) stay eager (routed.model.gemv.MIN_MODEL_BYTES); the script says so per shape
and warns where the engine did something else than the planner's rule (`engine_compiles`) expects.

The machine may be shared: before each `routed bench` call the script waits (up to --patience seconds) for a
2-second window in which other processes use at most --max-foreign of all CPU time; the call is timed against
/proc/stat, and when other processes used more than that while it ran it is run again (up to --tries times,
keeping the least disturbed). The other processes' share is recorded per command (`foreign_cpu`). Before each
shape the `local` hardware probe is re-run in a fresh process (its attention-score probe runs first, in a fresh
allocator state: routed.planner.hardware), at the same thread count, and recorded as `local_hardware`.

Measuring a shape again keeps the earlier file as bench_<shape>.session<n>.json. The planner is fitted
(routed.planner.calibrate) on every session of --calibrate-on (one checkpoint; pooling sessions averages the
shared machine's noise) that ran the same engine paths with the same probe as its latest session, with the
probe of the latest session, and predicts every run of the other shapes' latest sessions; the Markdown table,
with each error, is printed, then the largest error per shape of a fit on each single session of each shape.

A probe field added after a folder's files were measured (naive_score_ns, probe version 4: the naive-form
prefill attention) is missing from their `local_hardware`. `--reprobe N` re-runs the probe N times, each in a
fresh process (waiting for a quiet machine as above, recording the other processes' share), and writes
DIR/probe_supplement.json: every probe, the engine code it ran (and whether routed's model, engine, loader and
quant code equal those of the files' engine commit), and under `fill` the median of each missing field; the
report then takes those fields from it (routed.planner.calibrate.recorded_hardware) and says so. Run it from a
clean checkout whose engine code equals the files' engine.

The files measured on the eager engine of 720ff02 (before the compiled GEMV and decode) are kept under
benchmarks/results/plan_calibration/eager-720ff02/; tests/test_planner.py runs the pooled fit on them and, once
this script has written files measured on the current engine into benchmarks/results/plan_calibration/, on
those, and requires every prediction within 25%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ("tiny", "demo", "medium", "small")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plan_calibration"
THREADS = 1


def _jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def _children_jiffies() -> int:
    t = os.times()
    return round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


def wait_for_quiet(max_foreign: float, patience_s: float) -> None:
    """Sleep until other processes use at most `max_foreign` of the CPUs over 2 s (or `patience_s` ran out)."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        busy0, total0 = _jiffies()
        time.sleep(2.0)
        busy1, total1 = _jiffies()
        if (busy1 - busy0) / max(total1 - total0, 1) <= max_foreign:
            return
    print(f"  still busy after {patience_s:.0f} s of waiting; measuring anyway", file=sys.stderr)


PATIENCE_S = 900.0  # --patience


def run_bench(argv: list[str], tries: int, max_foreign: float) -> tuple[dict[str, Any], float]:
    """Run `routed bench ... --json` in a child process until it ran undisturbed; -> (its JSON, foreign share)."""
    best: tuple[dict[str, Any], float] | None = None
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, "-m", "routed.cli", "bench", *argv, "--threads", str(THREADS), "--json"]
    for attempt in range(tries):
        wait_for_quiet(max_foreign, PATIENCE_S)
        busy0, total0 = _jiffies()
        mine0 = _children_jiffies()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        busy1, total1 = _jiffies()
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        foreign = max(0, (busy1 - busy0) - (_children_jiffies() - mine0)) / max(total1 - total0, 1)
        result = json.loads(proc.stdout)
        print(f"  routed bench {' '.join(argv)}: other processes {foreign:.1%} of the CPUs (try {attempt + 1})",
              file=sys.stderr)
        if best is None or foreign < best[1]:
            best = (result, foreign)
        if foreign <= max_foreign:
            break
    assert best is not None
    return best


def probe_hardware() -> dict[str, Any]:
    """The `local` probe at THREADS threads, re-measured in a fresh process (fresh allocator, no compiled graphs)."""
    code = ("import json, torch; from routed.planner.hardware import local_hardware; "
            f"torch.set_num_threads({THREADS}); "
            f"print(json.dumps(local_hardware(remeasure=True, threads={THREADS}).to_dict()))")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"the local hardware probe failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def engine_key(raw: dict[str, Any]) -> tuple[Any, ...]:
    """What must agree for bench sessions to be pooled: the engine's compiled paths and the probe's version."""
    engine = raw.get("engine") or {}
    return bool(engine.get("gemv")), bool(engine.get("compiled_decode")), raw.get("probe_version", 2)


def checkpoint(shape: str, folder: Path) -> Path:
    if shape == "demo":
        return ROOT / "routed" / "demo_model"
    from routed.presets import PRESETS, write_random_checkpoint

    local = ROOT / "checkpoints" / shape
    if (local / "config.json").exists():
        cfg = json.loads((local / "config.json").read_text())
        if all(cfg.get(k) == v for k, v in PRESETS[shape].items() if k != "rope_scaling"):
            return local
    target = folder / shape
    if not (target / "model.safetensors.index.json").exists():
        write_random_checkpoint(shape, target)
    return target


def _short(run: dict[str, Any]) -> dict[str, Any]:
    keep = ("kind", "batch", "context", "prompt_len", "tokens_per_second", "spread", "runs", "experts_touched")
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items() if k in keep}


def bench_shape(shape: str, path: Path, out: Path, repeats: int, tries: int, max_foreign: float) -> Path:
    import torch

    from routed.config import ModelConfig
    from routed.planner.hardware import PROBE_VERSION
    from routed.planner.roofline import engine_compiles

    hw = probe_hardware()
    main_argv = ["--model", str(path), "--prompt-len", "256", "--gen-len", "32", "--batch", "1,2,4,8,16,32,64",
                 "--repeats", str(repeats)]
    short_argv = ["--model", str(path), "--prompt-len", "64", "--gen-len", "2", "--batch", "1",
                  "--repeats", str(repeats)]
    main, foreign_main = run_bench(main_argv, tries, max_foreign)
    short, foreign_short = run_bench(short_argv, tries, max_foreign)
    runs = [_short(r) for r in main["runs"]]
    runs.insert(0, _short(next(r for r in short["runs"] if r["kind"] == "prefill")))
    engine = main.get("engine")
    if engine is None:
        raise SystemExit("routed bench --json did not record `engine`; this script needs a routed that does")
    if {k: v for k, v in engine.items()} != short.get("engine"):
        raise SystemExit(f"{shape}: the two routed bench commands ran different engines: {engine} vs "
                         f"{short.get('engine')}")
    expected = engine_compiles(ModelConfig.from_dict(main["model"]["config"]), main["quant"] or "bf16")
    state = "compiled one-token decode at batch 1" if engine["compiled_decode"] else "eager decode"
    print(f"  {shape}: {state}, GEMV {'on' if engine['gemv'] else 'off'} (engine {engine.get('commit')})",
          file=sys.stderr)
    if engine["compiled_decode"] != expected or engine["gemv"] != expected:
        print(f"  warning: the planner's rule expects {shape} {'compiled' if expected else 'eager'}; the bench "
              "file's `engine` is what the fit uses", file=sys.stderr)
    result = {
        "model": {"preset": shape, "path": os.path.relpath(path, ROOT), "config": main["model"]["config"]},
        "dtype": main["dtype"], "quant": main["quant"], "max_ram_gb": main["max_ram_gb"], "threads": main["threads"],
        "torch": torch.__version__, "engine": engine, "probe_version": PROBE_VERSION,
        "commands": [f"routed bench {' '.join(a)} --threads {THREADS} --json" for a in (main_argv, short_argv)],
        "foreign_cpu": [round(foreign_main, 3), round(foreign_short, 3)],
        "note": "runs: the 64-token prefill of the second command, then every run of the first",
        "local_hardware": hw,
        "runs": runs,
    }
    file = out / f"bench_{shape}.json"
    if file.exists():  # keep the earlier session: the fit pools every session of the calibrated shape
        n = 1
        while (out / f"bench_{shape}.session{n}.json").exists():
            n += 1
        file.rename(out / f"bench_{shape}.session{n}.json")
    file.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"  {r}", file=sys.stderr)
    return file


def sessions(files: dict[str, Path], shape: str) -> list[Path]:
    """The sessions of `shape` to pool: bench_<shape>.json and the earlier bench_<shape>.session<n>.json that ran
    the same engine paths with the same probe (engine_key)."""
    latest = engine_key(json.loads(files[shape].read_text()))
    earlier = sorted(files[shape].parent.glob(f"bench_{shape}.session*.json"))
    return [f for f in earlier if engine_key(json.loads(f.read_text())) == latest] + [files[shape]]


def reprobe(out: Path, count: int, max_foreign: float) -> Path:
    """Re-run the `local` probe `count` times in fresh processes; write out/probe_supplement.json (module docstring)."""
    import statistics

    from routed.bench import _commit
    from routed.planner.calibrate import PROBE_SUPPLEMENT
    from routed.planner.hardware import PROBE_VERSION

    stored = [json.loads(f.read_text()) for f in sorted(out.glob("bench_*.json"))]
    if not stored:
        raise SystemExit(f"{out}: no bench files to re-probe for")
    missing = sorted({k for raw in stored for k in ("naive_score_ns",) if raw["local_hardware"].get(k) is None})
    engines = sorted({str((raw.get("engine") or {}).get("commit")) for raw in stored})
    probes, foreign = [], []
    for i in range(count):
        wait_for_quiet(max_foreign, PATIENCE_S)
        busy0, total0 = _jiffies()
        mine0 = _children_jiffies()
        probes.append(probe_hardware())
        busy1, total1 = _jiffies()
        foreign.append(round(max(0, (busy1 - busy0) - (_children_jiffies() - mine0)) / max(total1 - total0, 1), 3))
        print(f"  probe {i + 1}: other processes {foreign[-1]:.1%} of the CPUs; "
              + ", ".join(f"{k} {probes[-1].get(k)}" for k in ("score_ns", "naive_score_ns", "logit_ns")),
              file=sys.stderr)
    same = {}
    for commit in engines:
        paths = ["routed/model", "routed/engine", "routed/loader.py", "routed/quant"]
        diff = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", commit.split("+")[0], "--", *paths],
                              capture_output=True)
        same[commit] = diff.returncode == 0  # also compares uncommitted changes of this checkout
    commit = _commit()
    result = {
        "note": f"the `local` probe (version {PROBE_VERSION}) re-run {count} times in fresh processes at {THREADS} "
                f"thread(s) after the bench files in this folder were measured, for the field(s) their recorded "
                f"probe lacks ({', '.join(missing) or 'none'}); `fill`: the median of each",
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "engine": commit, "bench_engines": engines,
        "engine_code_equals_bench_engine": same,  # routed/model, engine, loader, quant: git diff against each
        "threads": THREADS, "probe_version": PROBE_VERSION, "foreign_cpu": foreign,
        "fill": {k: round(statistics.median(p[k] for p in probes), 3) for k in missing},
        "probes": probes,
    }
    file = out / PROBE_SUPPLEMENT
    file.write_text(json.dumps(result, indent=1) + "\n")
    return file


def report(files: dict[str, Path], calibrate_on: str) -> tuple[str, float]:
    """Fit on every session of one shape, predict every shape's latest runs; -> (Markdown, worst error off it)."""
    from routed.planner.calibrate import calibrate, load_bench, recorded_hardware

    benches = {shape: load_bench(file) for shape, file in files.items()}
    hw, where = recorded_hardware(files[calibrate_on])
    fitted = sessions(files, calibrate_on)
    fit = calibrate([load_bench(f) for f in fitted], hw)
    lines = [
        f"Hardware `local` ({where}, the latest `{calibrate_on}` session): {hw.describe()}",
        f"Fitted on `{calibrate_on}` ({len(fitted)} session(s): {', '.join(f.name for f in fitted)}): "
        f"{fit.efficiency.describe()} (RMS log error {fit.rms_log_error:.3f})",
        "",
        "| shape | run | measured tok/s | predicted tok/s | error | bound |",
        "|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for shape in files:
        for row in fit.predict(benches[shape], hw):
            if shape != calibrate_on:
                worst = max(worst, abs(row.error))
            tag = " (fit, latest session)" if shape == calibrate_on else ""
            lines.append(f"| {shape}{tag} | {row.label} | {row.measured:.1f} | {row.predicted:.1f} | "
                         f"{row.error:+.1%} | {row.bound} |")
    lines += ["", f"Largest error on the shapes not fitted: {worst:.1%}", "",
              "Fitted on one session of one shape at a time (its own recorded probe): largest |error| per shape", "",
              "| fitted on | fitted factors | " + " | ".join(files) + " |", "|---|---|" + "---|" * len(files)]
    for on in files:
        for file in sessions(files, on):
            own, _ = recorded_hardware(file)
            other = calibrate([load_bench(file)], own)
            cells = [f"{max(abs(r.error) for r in other.predict(benches[shape], own)):.1%}" for shape in files]
            e = other.efficiency
            factors = f"η_mem {e.memory:.3g}, η_compute {e.compute:.3g}, t_op {e.op_s * 1e6:.3g} µs"
            lines.append(f"| {file.name} | {factors} | " + " | ".join(cells) + " |")
    return "\n".join(lines), worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for bench_<shape>.json")
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/routed_plan_calibration"),
                        help="where random checkpoints are written (once)")
    parser.add_argument("--calibrate-on", default="medium", help="the shape the planner is fitted on (default medium)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; routed bench keeps the median")
    parser.add_argument("--tries", type=int, default=3, help="attempts per command before keeping the least disturbed")
    parser.add_argument("--max-foreign", type=float, default=0.1, metavar="SHARE",
                        help="rerun a command when other processes used more than this share of all CPUs")
    parser.add_argument("--patience", type=float, default=900.0, metavar="SECONDS",
                        help="before each command, wait up to this long for a quiet machine (default 900)")
    parser.add_argument("--report-only", action="store_true", help="do not measure; use the files in --out")
    parser.add_argument("--reprobe", type=int, default=0, metavar="N",
                        help="re-run the probe N times for the fields the stored files' probes lack, write "
                             "--out/probe_supplement.json, then report (implies --report-only)")
    args = parser.parse_args()
    global PATIENCE_S
    PATIENCE_S = args.patience
    shapes = [s for s in args.shapes.split(",") if s]
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shape(s) {unknown}; choose from {SHAPES}")
    if args.calibrate_on not in shapes:
        parser.error(f"--calibrate-on {args.calibrate_on!r} is not among --shapes")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reprobe:
        args.report_only = True
        print(f"wrote {reprobe(args.out, args.reprobe, args.max_foreign)}", file=sys.stderr)
    files = {}
    for shape in shapes:
        file = args.out / f"bench_{shape}.json"
        if not args.report_only:
            print(f"{shape}:", file=sys.stderr)
            path = checkpoint(shape, args.checkpoints)
            file = bench_shape(shape, path, args.out, args.repeats, args.tries, args.max_foreign)
        elif not file.exists():
            parser.error(f"{file} does not exist; run without --report-only first")
        files[shape] = file
    text, _ = report(files, args.calibrate_on)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
