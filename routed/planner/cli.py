"""`routed plan`: will a model fit, how fast will it run, and what will a million tokens cost.

`add_parser(subparsers)` registers the subcommand; `cmd_plan(args)` runs it and returns the exit status.
Bad input (unknown preset or hardware, a model that does not fit, --tp/--ep that do not divide) raises
RoutedError, which the `routed` entry point prints on one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from routed.argtypes import positive_int
from routed.errors import RoutedError

_EPILOG = """\
hardware: h800, h100, h200, a100, b200 (figures and prices with their sources), local (this machine,
probed once and cached in ~/.cache/routed/local_hardware.json), or a JSON file:
  {"name": "my-gpu", "memory_gb": 48, "memory_bandwidth_gb_s": 960, "bf16_tflops": 181,
   "fp8_tflops": 362, "nvlink_gb_s": 0, "network_gb_s": 12.5, "devices_per_node": 4, "price_per_hour": 0.99}
(per device; bandwidths one direction; GB = 1e9 bytes; fp8_tflops null when there are no fp8 units).

Every figure is a roofline: bytes over bandwidth, FLOPs over peak and all-to-all bytes over the link, times
the efficiency factors printed with the plan. --calibrate fits them to `routed bench --json` files measured on
the same --hardware. See docs/cost.md for the model checked against DeepSeek's published deployment.

examples:
  routed plan --preset deepseek-v3 --hardware h800 --gpus 144 --ep 144 --weights fp8 --context 4989 --batch 128
  routed plan --preset small --hardware local --calibrate bench.json --plot small.png
"""


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a price cannot be negative")
    return value


def add_parser(subparsers: Any) -> None:
    from routed.planner.memory import WEIGHT_FORMATS
    from routed.planner.models import MODEL_PRESETS

    p = subparsers.add_parser(
        "plan", help="memory, throughput and $ per million tokens of a deployment, before running it",
        description="Plan a deployment from the config alone: weight bytes by part, latent cache per token, the "
                    "largest batch that fits, decode and prefill throughput from a roofline, and cost per million "
                    "tokens.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="checkpoint folder (or config.json) to plan for")
    src.add_argument("--preset", metavar="NAME", help="a released model's config: " + ", ".join(MODEL_PRESETS))
    p.add_argument("--hardware", required=True, metavar="PRESET|FILE",
                   help="h800, h100, h200, a100, b200, local, or a hardware JSON file (see below)")
    p.add_argument("--gpus", type=positive_int, default=1, help="devices in the deployment (default 1)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size of attention/dense (default 1)")
    p.add_argument("--ep", type=positive_int, default=None, help="expert-parallel size (default: --gpus)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                   help="weight format (default: fp8 for FP8 checkpoints, else bf16)")
    p.add_argument("--context", type=positive_int, default=4096,
                   help="tokens of context per sequence: decode attends this many, prefill computes prompts this "
                        "long (default 4096)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="decoding sequences per device (per TP group); default: the most that fit, at most 128")
    p.add_argument("--price-per-hour", type=_price, default=None, metavar="USD",
                   help="price of one device-hour (default: the hardware preset's, with its source)")
    p.add_argument("--calibrate", nargs="+", metavar="BENCH.json",
                   help="fit the efficiency factors to `routed bench --json` output measured on this --hardware")
    p.add_argument("--plot", metavar="OUT.png",
                   help="write throughput and $/Mtok against batch size, with the roofline")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_plan)


def _load_model(args: argparse.Namespace) -> tuple[str, Any]:
    from routed.config import ModelConfig
    from routed.planner.models import preset_config

    if args.preset:
        return args.preset, preset_config(args.preset)
    return Path(args.model).resolve().name, ModelConfig.from_pretrained(args.model)


def _hardware(spec: str, benches: list[Any]) -> Any:
    """`local` is probed at the thread count the bench files were measured at, so the two agree."""
    from routed.planner.hardware import get_hardware, local_hardware

    if spec.lower() != "local":
        return get_hardware(spec)
    threads = {b.threads for b in benches if b.threads}
    if len(threads) > 1:
        raise RoutedError(f"the bench files were measured at different thread counts {sorted(threads)}; "
                          "calibrate on files from one thread count")
    return local_hardware(threads=threads.pop() if threads else None)


def cmd_plan(args: argparse.Namespace) -> int:
    from routed.planner.calibrate import calibrate, load_bench
    from routed.planner.memory import Parallelism
    from routed.planner.plan import PlanRequest, batch_sweep, make_plan
    from routed.planner.roofline import Efficiency

    name, cfg = _load_model(args)
    benches = [load_bench(f) for f in args.calibrate] if args.calibrate else []
    hw = _hardware(args.hardware, benches)
    if args.context > cfg.max_position_embeddings:
        raise RoutedError(f"--context {args.context} is beyond the model's max_position_embeddings "
                          f"({cfg.max_position_embeddings})")
    par = Parallelism(args.gpus, args.tp, args.ep if args.ep is not None else args.gpus)
    fit = calibrate(benches, hw) if benches else None
    eff = fit.efficiency if fit else Efficiency()
    req = PlanRequest(name, cfg, hw, par, args.weights, args.context, args.batch, args.price_per_hour, eff)
    plan = make_plan(req)
    plot_path = None
    if args.plot:
        from routed.planner.plot import plot_sweep

        plot_path = plot_sweep(plan, batch_sweep(req, plan), args.plot)
    if args.json:
        out = plan.to_dict()
        out["calibration"] = fit.to_dict() if fit else None
        out["plot"] = str(plot_path) if plot_path else None
        print(json.dumps(out, indent=2))
        return 0
    _print_plan(plan, fit, plot_path)
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def _print_plan(plan: Any, fit: Any, plot_path: Path | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from routed.planner.plan import SCALES, STAYS_BF16

    d = plan.to_dict()
    req, hw, par = plan.request, plan.request.hardware, plan.request.parallelism
    console = Console()
    console.print(f"[bold]{escape(req.model_name)}[/bold] on [bold]{escape(hw.describe())}[/bold]")
    console.print(f"{par.gpus} device(s) ({plan.nodes:g} node(s) of {hw.devices_per_node}): attention TP{par.tp} x "
                  f"DP{par.dp}, routed experts EP{par.ep}; weights {plan.fmt} (scales: {SCALES[plan.fmt]}"
                  + (f"; bf16: {STAYS_BF16}" if plan.fmt != "bf16" else "") + ")")
    for what, src in hw.sources.items():
        console.print(f"  [dim]{escape(what)}: {escape(src)}[/dim]")

    t = Table("weights", "parameters", f"bytes ({plan.fmt})", "per device", title="Memory")
    for part, n in plan.weights.params.items():
        t.add_row(part, f"{n / 1e9:,.3f} B", _gb(plan.weights.bytes[part]), _gb(plan.weights.device_bytes[part]))
    t.add_row("[bold]total[/bold]", f"{plan.weights.total_params / 1e9:,.3f} B", _gb(plan.weights.total_bytes),
              _gb(plan.weights.device_total))
    console.print(t)
    m = d["memory"]
    console.print(f"per device: {_gb(m['usable_bytes'])} usable ({m['utilization']:.0%} of {hw.memory_gb:g} GB), "
                  f"{_gb(m['weight_bytes'])} weights; latent cache {m['kv_bytes_per_token']:,} B/token (bf16) -> "
                  f"{m['kv_tokens_fit']:,} tokens fit = batch {m['max_batch_at_context']:,} at context "
                  f"{req.context:,}; this plan: batch {plan.batch} uses {_gb(m['kv_bytes_at_batch'])}")

    t = Table(title="Throughput (roofline per step)")
    t.add_column("per step, one device", no_wrap=True)
    t.add_column("decode")
    t.add_column("prefill")
    dec, pre = plan.decode, plan.prefill
    rows = [
        ("work", f"{plan.batch} seq x 1 token at {req.context:,} ctx" + (" (compiled)" if dec.work.compiled else ""),
         f"{plan.prefill_prompts} prompt(s) x {req.context:,} tokens"),
        ("step", f"{dec.step_s * 1e3:,.2f} ms", f"{pre.step_s * 1e3:,.2f} ms"),
        ("  memory: weights + cache", f"{dec.memory_s * 1e3:,.2f} ms", f"{pre.memory_s * 1e3:,.2f} ms"),
        ("  compute: linear + attention", f"{dec.compute_s * 1e3:,.2f} ms", f"{pre.compute_s * 1e3:,.2f} ms"),
        ("  interconnect", f"{dec.comm_s * 1e3:,.2f} ms", f"{pre.comm_s * 1e3:,.2f} ms"),
        ("  engine overhead: ops x t_op" + (" (+ blocks)" if dec.work.compiled else ""),
         f"{dec.overhead_s * 1e3:,.2f} ms", f"{pre.overhead_s * 1e3:,.2f} ms"),
        ("  eager: activations, scores, logits", f"{dec.eager_s * 1e3:,.2f} ms", f"{pre.eager_s * 1e3:,.2f} ms"),
        ("bound", dec.bound, pre.bound),
        ("tokens/s per device", _rate(dec.tokens_per_second), _rate(pre.tokens_per_second)),
        ("tokens/s per node", _rate(plan.per_node(dec)), _rate(plan.per_node(pre))),
        ("tokens/s, all devices", _rate(dec.tokens_per_second * par.gpus), _rate(pre.tokens_per_second * par.gpus)),
    ]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print(f"decode: {1 / dec.step_s:.1f} tokens/s per sequence; "
                  f"{dec.work.experts_touched:.1f} of the device's experts read per MoE layer per step")
    if plan.price_per_hour is None:
        console.print("cost: no price for this hardware; pass --price-per-hour USD")
    else:
        console.print(f"cost at ${plan.price_per_hour:g}/device-hour ({d['cost']['price_source']}): "
                      f"[bold]${plan.output_cost:.4g}[/bold] per million output tokens, "
                      f"[bold]${plan.input_cost:.4g}[/bold] per million input tokens")
    console.print(escape(f"efficiency: {req.efficiency.describe()}; {d['step_model']}"))
    if fit:
        t = Table("bench", "run", "measured tok/s", "predicted tok/s", "error", "bound",
                  title=f"Calibration (RMS log error {fit.rms_log_error:.3f})", caption=escape(fit.efficiency.source))
        for r in fit.rows:
            t.add_row(escape(r.bench), r.label, _rate(r.measured), _rate(r.predicted), f"{r.error:+.1%}", r.bound)
        console.print(t)
    for note in plan.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    if plot_path:
        console.print(f"wrote {plot_path}")
