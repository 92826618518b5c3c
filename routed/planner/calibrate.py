"""Fit the planner's efficiency factors to measured throughput (`routed bench --json` files).

Bench file schema (one JSON object; extra fields are ignored):

    {"model": {"config": <config.json dict>}, "dtype": "bf16", "threads": 2,
     "engine": {"commit": "1885bd0", "gemv": true, "compiled_decode": true,    # optional (see below)
                "attention": "auto"},
     "runs": [{"kind": "decode", "batch": 1, "context": 64, "tokens_per_second": 20.5},
              {"kind": "prefill", "batch": 1, "prompt_len": 512, "tokens_per_second": 300.0}, ...]}

A decode run's rate counts generated tokens over decode time at `batch` sequences attending `context` cached
tokens; a prefill run's counts prompt tokens over the prefill step of `batch` prompts of `prompt_len`.
The runs are routed's own: one device, attention in the form the engine ran (`engine.attention`, below),
bf16 weights or the format named by `quant` (int8/int4/fp8 as memory.py sizes them); benches with offloaded experts
(`max_ram_gb`) are refused. A run may
carry `experts_touched` (distinct experts per MoE layer per step, measured); the planner then reads that
many experts instead of the uniform-routing expectation — random checkpoints route far from uniformly.
`engine` says which of the engine's compiled paths the bench ran (`routed bench --json` records it): `gemv`
(routed.model.gemv's one-row products) and `compiled_decode` (`Transformer.compile_decode`: decode at batch 1
is a compiled one-token step). A file without it is modelled as the eager engine without either, which is
what routed was before commit ed9e2d6 (the files of that time, under
benchmarks/results/plan_calibration/eager-720ff02/, record it so). `attention` is the model's attention impl
(routed bench records it): "auto" — since 93f469e the engine's default: a whole prompt in the naive form
(keys expanded once, queries in causal chunks), decode absorbed, per routed.model.attention.use_naive —
or "absorb", what every engine before 93f469e ran. Absent, it is "auto" when the file records an `engine`
(routed bench has recorded one since 70b0088, after 93f469e) and "absorb" when it does not; the files of
720ff02 carry "absorb" (recorded afterwards, as their other engine fields).

What is fitted, by least squares on log(predicted / measured) over every run of every file given:
η_mem (memory bandwidth efficiency; decode runs pin it), η_compute (compute efficiency; long prefills pin
it) and t_op, the seconds per engine op (roofline.engine_ops: routed's eager op count per step, which grows
with layers, sequences and experts run; short prefills and decode at growing batch pin it). The runs are
modelled as routed's eager engine (`step_work(..., eager=True)`): activation traffic, attention scores and
logits are charged at the hardware's probed rates, which are measured, not fitted; decode runs at batch 1 of a
bench whose engine compiled (`compiled_decode`) as routed's compiled one-token step (roofline.py), whose row
rate, per-block cost and per-score cost are probed too — only its 49 per-step ops take the fitted t_op; with
`gemv`, the lm_head of a batch-1 prefill is read at the probed row rate. The overhead is kept only when the
fit without it is off by more than 1% RMS and the overhead cuts that error by at least 10% — otherwise it is 0
and says so. Interconnect efficiency and overlap are not fitted (single-device benches
cannot see them) and keep their defaults. The minimiser is Nelder-Mead on the logs of the factors, from a
few starting points.

Which checkpoint to calibrate on: one whose steps have the three fitted terms in comparable measure. On this
machine (BENCHMARKS.md, "Planner calibration"; measured on the eager engine of 720ff02) a fit on `medium`
predicts `tiny`, the demo model and `small` within 25%; a fit on `small` alone does not, because its decode
steps are dominated by streaming weights and its op count and its bytes grow together with the batch, so η_mem
and t_op trade against each other and the pair that fits `small` best is off for shapes where ops dominate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.planner.hardware import Hardware
from routed.planner.memory import WEIGHT_FORMATS, Parallelism
from routed.planner.roofline import COMPILED_FORMATS, ENGINE_ATTENTION, Efficiency, StepWork, step_time, step_work

OVERHEAD_GAIN = 0.9  # keep the overhead term only if it brings the RMS log error below 90% of the fit without
OVERHEAD_NEEDED = 0.01  # ... and only if the fit without it is off by more than 1% RMS


@dataclass(slots=True, frozen=True)
class BenchRun:
    kind: str  # decode | prefill
    batch: int
    tokens_per_second: float
    context: int = 0  # decode: cached tokens each sequence attends
    prompt_len: int = 0  # prefill: prompt tokens per sequence
    experts_touched: float | None = None  # measured distinct experts per MoE layer per step, if recorded

    @property
    def label(self) -> str:
        if self.kind == "decode":
            return f"decode batch {self.batch}, context {self.context}"
        return f"prefill batch {self.batch} x {self.prompt_len} tokens"


@dataclass(slots=True, frozen=True)
class Bench:
    name: str
    config: ModelConfig
    fmt: str  # weight format in memory: bf16, or the bench's `quant`
    threads: int | None
    runs: tuple[BenchRun, ...]
    gemv: bool = False  # the engine's compiled one-row products were on (`engine.gemv`)
    compiled_decode: bool = False  # decode at batch 1 ran compiled (`engine.compiled_decode`)
    engine: str | None = None  # the engine's commit, when recorded
    attention: str = "absorb"  # the model's attention impl (`engine.attention`): auto, absorb or naive


@dataclass(slots=True, frozen=True)
class PredictionRow:
    bench: str
    label: str
    measured: float  # tokens/s
    predicted: float
    bound: str

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1


def load_bench(path: str | Path) -> Bench:
    path = Path(path)
    if not path.is_file():
        raise RoutedError(f"{path}: no such bench file (produce one with `routed bench --json`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RoutedError(f"{path}: not valid JSON ({e})") from None
    return bench_from_dict(raw, str(path))


def bench_from_dict(raw: Any, source: str = "<bench>") -> Bench:
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "config" not in raw["model"]:
        raise RoutedError(f"{source}: expected {{\"model\": {{\"config\": {{...}}}}, \"runs\": [...]}}")
    cfg = ModelConfig.from_dict(raw["model"]["config"], source=f"{source}: model.config")
    dtype = raw.get("dtype", "bf16")
    if dtype not in ("bf16", "bfloat16"):
        raise RoutedError(f"{source}: dtype {dtype!r}; calibration reads bf16 benches only")
    fmt = raw.get("quant") or "bf16"
    if fmt not in WEIGHT_FORMATS:
        raise RoutedError(f"{source}: quant {fmt!r}; the planner knows {', '.join(WEIGHT_FORMATS)}")
    if raw.get("max_ram_gb"):
        raise RoutedError(f"{source}: measured with experts offloaded (max_ram_gb); the planner does not model "
                          "reading experts from disk, so it cannot calibrate on it")
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise RoutedError(f"{source}: `runs` must be a non-empty list")
    runs = []
    for i, r in enumerate(runs_raw):
        where = f"{source}: runs[{i}]"
        if not isinstance(r, dict) or r.get("kind") not in ("decode", "prefill"):
            raise RoutedError(f"{where}: `kind` must be decode or prefill")
        need = ("batch", "tokens_per_second", "context" if r["kind"] == "decode" else "prompt_len")
        for key in need:
            v = r.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise RoutedError(f"{where}: `{key}` must be a positive number, got {v!r}")
        touched = r.get("experts_touched")
        if touched is not None and (not isinstance(touched, (int, float)) or touched < 0):
            raise RoutedError(f"{where}: `experts_touched` must be a non-negative number, got {touched!r}")
        runs.append(BenchRun(r["kind"], int(r["batch"]), float(r["tokens_per_second"]),
                             int(r.get("context", 0)), int(r.get("prompt_len", 0)),
                             None if touched is None else float(touched)))
    engine = raw.get("engine") or {}
    if not isinstance(engine, dict):
        raise RoutedError(f"{source}: `engine` must be an object ({{\"gemv\": bool, \"compiled_decode\": bool}})")
    flags = {}
    for key in ("gemv", "compiled_decode"):
        v = engine.get(key, False)
        if not isinstance(v, bool):
            raise RoutedError(f"{source}: engine.{key} must be true or false, got {v!r}")
        flags[key] = v
    if flags["compiled_decode"] and fmt not in COMPILED_FORMATS:
        raise RoutedError(f"{source}: measured with routed's compiled one-token decode in {fmt}, which the planner "
                          f"does not model (only {', '.join(COMPILED_FORMATS)}); calibrate on bf16 benches")
    attention = engine.get("attention") or ("auto" if engine else "absorb")  # module docstring
    if attention not in ENGINE_ATTENTION:
        raise RoutedError(f"{source}: engine.attention {attention!r}; routed's impls are {', '.join(ENGINE_ATTENTION)}")
    commit = engine.get("commit")
    name = raw["model"].get("preset") or Path(source).stem
    return Bench(str(name), cfg, fmt, raw.get("threads"), tuple(runs), flags["gemv"], flags["compiled_decode"],
                 None if commit is None else str(commit), attention)


PROBE_SUPPLEMENT = "probe_supplement.json"  # beside bench files whose recorded probe predates a probe field


def recorded_hardware(bench_file: str | Path) -> tuple[Hardware, str]:
    """The `local` probe a bench file of benchmarks/plan_calibration.py recorded (`local_hardware`, measured just
    before that shape's benches); -> (hardware, a note on where its figures come from).

    A probe field added after the file was measured (naive_score_ns, probe version 4) is absent there; it is then
    taken from PROBE_SUPPLEMENT in the same folder — the probe re-run afterwards on the same machine and engine
    code, written by `plan_calibration.py --reprobe`, whose `fill` holds the figures to add — and the note says so.
    Only missing fields are filled: what the file recorded is kept."""
    from routed.planner.hardware import hardware_from_dict

    bench_file = Path(bench_file)
    raw = json.loads(bench_file.read_text())
    recorded = raw.get("local_hardware")
    if not isinstance(recorded, dict):
        raise RoutedError(f"{bench_file}: no recorded `local_hardware` probe")
    hw = hardware_from_dict(recorded, str(bench_file))
    supplement = bench_file.parent / PROBE_SUPPLEMENT
    missing = [k for k in ("naive_score_ns",) if recorded.get(k) is None]
    if not missing or not supplement.is_file():
        return hw, f"probe recorded with {bench_file.name}"
    extra = json.loads(supplement.read_text())
    fill = {k: extra["fill"][k] for k in missing if extra.get("fill", {}).get(k) is not None}
    if not fill:
        return hw, f"probe recorded with {bench_file.name}"
    sources = {**hw.sources, **{k: f"{PROBE_SUPPLEMENT}: {extra.get('note', 're-probed afterwards')}" for k in fill}}
    hw = replace(hw, **fill, sources=sources)
    figures = ", ".join(f"{k} {v:g}" for k, v in fill.items())
    return hw, (f"probe recorded with {bench_file.name}, + {figures} from {PROBE_SUPPLEMENT} (re-probed "
                f"{extra.get('measured', 'afterwards')}, engine {extra.get('engine', '?')})")


def run_work(cfg: ModelConfig, run: BenchRun, fmt: str = "bf16", gemv: bool = False,
             compiled_decode: bool = False, attention: str = "auto") -> StepWork:
    """What routed does for one bench run: one device, its eager engine (attention impl `attention`), weights in
    `fmt`; with the compiled paths the bench recorded (decode at batch 1 compiled, one-row products at the row
    rate)."""
    engine = {"eager": True, "gemv": gemv, "compile_decode": compiled_decode, "attention": attention}
    if run.kind == "decode":
        return step_work(cfg, fmt, Parallelism(), "decode", run.batch, run.context,
                         experts_touched=run.experts_touched, **engine)
    return step_work(cfg, fmt, Parallelism(), "prefill", run.batch, 0, new_tokens=run.prompt_len,
                     experts_touched=run.experts_touched, **engine)


def bench_work(bench: Bench, run: BenchRun) -> StepWork:
    return run_work(bench.config, run, bench.fmt, bench.gemv, bench.compiled_decode, bench.attention)


def predict(benches: Sequence[Bench], hw: Hardware, eff: Efficiency) -> list[PredictionRow]:
    rows = []
    for bench in benches:
        for run in bench.runs:
            t = step_time(bench_work(bench, run), hw, eff)
            label = run.label + (" (compiled)" if t.work.compiled else "")
            rows.append(PredictionRow(bench.name, label, run.tokens_per_second, t.tokens_per_second, t.bound))
    return rows


@dataclass(slots=True)
class Calibration:
    efficiency: Efficiency
    rms_log_error: float
    rows: list[PredictionRow]  # the fitted runs, predicted with the fitted factors
    overhead_fitted: bool

    def predict(self, bench: Bench, hw: Hardware) -> list[PredictionRow]:
        return predict([bench], hw, self.efficiency)

    def to_dict(self) -> dict[str, Any]:
        return {
            "efficiency": self.efficiency.to_dict(), "rms_log_error": self.rms_log_error,
            "overhead_fitted": self.overhead_fitted,
            "runs": [{"bench": r.bench, "run": r.label, "measured_tokens_per_second": r.measured,
                      "predicted_tokens_per_second": r.predicted, "error": r.error, "bound": r.bound}
                     for r in self.rows],
        }


def calibrate(benches: Sequence[Bench], hw: Hardware, base: Efficiency | None = None) -> Calibration:
    """Fit η_mem, η_compute (and an overhead if it earns its place) to every run of `benches` on `hw`."""
    base = base or Efficiency()
    pairs = [(bench_work(b, r), r.tokens_per_second) for b in benches for r in b.runs]
    if not pairs:
        raise RoutedError("no bench runs to calibrate on")

    def efficiency(x: Sequence[float], with_overhead: bool) -> Efficiency:
        return replace(base, memory=math.exp(x[0]), compute=math.exp(x[1]),
                       op_s=math.exp(x[2]) if with_overhead else 0.0)

    def loss(x: Sequence[float], with_overhead: bool) -> float:
        eff = efficiency(x, with_overhead)
        return sum(math.log(step_time(w, hw, eff).tokens_per_second / rate) ** 2 for w, rate in pairs)

    fits = {}
    for with_overhead in (False, True):
        starts = [(math.log(m), math.log(c), math.log(o)) for m in (0.5, 0.05) for c in (0.5, 0.05)
                  for o in (1e-5, 1e-6)]
        best = min((nelder_mead(lambda x: loss(x, with_overhead), s) for s in starts), key=lambda r: r[1])
        fits[with_overhead] = (best[0], math.sqrt(best[1] / len(pairs)))
    use_overhead = fits[False][1] > OVERHEAD_NEEDED and fits[True][1] < OVERHEAD_GAIN * fits[False][1]
    x, rms = fits[use_overhead]
    names = ", ".join(dict.fromkeys(b.name for b in benches))
    files = f", {len(benches)} bench files" if len(benches) > 1 else ""
    eff = replace(efficiency(x, use_overhead), source=f"calibrated on {names} ({hw.name}{files})")
    return Calibration(eff, rms, predict(benches, hw, eff), use_overhead)


def nelder_mead(
    f: Callable[[Sequence[float]], float], x0: Sequence[float], step: float = 0.7, iters: int = 600,
    tol: float = 1e-12,
) -> tuple[list[float], float]:
    """Minimise f from x0 (a small, dependency-free Nelder-Mead); -> (x, f(x))."""
    n = len(x0)
    simplex = [list(x0)] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    values = [f(p) for p in simplex]
    for _ in range(iters):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tol:
            break
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]

        def towards(t: float) -> list[float]:
            return [c + t * (w - c) for c, w in zip(centroid, simplex[-1])]

        reflected = towards(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = towards(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = towards(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best point
                simplex = [simplex[0]] + [[b + 0.5 * (p - b) for b, p in zip(simplex[0], q)] for q in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    i = min(range(n + 1), key=values.__getitem__)
    return simplex[i], values[i]
