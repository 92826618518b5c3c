"""The plan as a picture: decode throughput and $ per million output tokens against batch size.

Top panel (log-log): tokens/s per device from the step model, and the three ceilings it sits under — what
the memory traffic alone, the arithmetic alone and the interconnect alone would allow — with the batch
range shaded by which of them binds (memory-, compute- or interconnect-bound). The plan's batch and the
largest batch whose cache fits are marked. Bottom panel: $ per million output tokens at the device price.
matplotlib is imported here only, so the planner works without it until a picture is asked for.
"""

from __future__ import annotations

from pathlib import Path

from routed.planner.plan import Plan
from routed.planner.roofline import StepTime, cost_per_million

_REGIME_COLORS = {"memory": "#dbe9f6", "compute": "#fde2c8", "interconnect": "#e3f1df", "overhead": "#eeeeee",
                  "eager": "#f3e5f5"}


def _ceiling(t: StepTime, seconds: float) -> float:
    return t.work.tokens / seconds if seconds > 0 else float("nan")


def plot_sweep(plan: Plan, sweep: list[tuple[int, StepTime]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    req = plan.request
    batches = [b for b, _ in sweep]
    tps = [t.tokens_per_second for _, t in sweep]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})

    # shade each batch interval by the term that binds there
    edges = [batches[0] / 1.2] + [(a * b) ** 0.5 for a, b in zip(batches, batches[1:])] + [batches[-1] * 1.2]
    seen: set[str] = set()
    for i, (_, t) in enumerate(sweep):
        label = f"{t.bound}-bound" if t.bound not in seen else None
        seen.add(t.bound)
        for ax in (top, bottom):
            ax.axvspan(edges[i], edges[i + 1], color=_REGIME_COLORS[t.bound], lw=0, label=label if ax is top else None)

    top.plot(batches, [_ceiling(t, t.memory_s) for _, t in sweep], "--", color="#1f77b4", lw=1.2,
             label="memory ceiling (bytes / bandwidth)")
    top.plot(batches, [_ceiling(t, t.compute_s) for _, t in sweep], "--", color="#ff7f0e", lw=1.2,
             label="compute ceiling (FLOPs / peak)")
    if any(t.comm_s > 0 for _, t in sweep):
        top.plot(batches, [_ceiling(t, t.comm_s) for _, t in sweep], "--", color="#2ca02c", lw=1.2,
                 label="interconnect ceiling (all-to-all bytes / link)")
    if any(t.overhead_s > 0 for _, t in sweep):
        top.plot(batches, [_ceiling(t, t.overhead_s) for _, t in sweep], "--", color="#7f7f7f", lw=1.2,
                 label="engine-overhead ceiling (ops x t_op)")
    if any(t.eager_s > 0 for _, t in sweep):
        top.plot(batches, [_ceiling(t, t.eager_s) for _, t in sweep], "--", color="#9467bd", lw=1.2,
                 label="eager ceiling (activations, scores, logits)")
    how = ("max(memory, compute) per kernel + interconnect" if req.hardware.overlap_memory_compute
           else "memory + compute + overhead + eager" if req.hardware.eager else "memory + compute + overhead")
    top.plot(batches, tps, "-o", color="black", ms=3, lw=2, label=f"predicted tokens/s per device ({how})")
    top.set_yscale("log")
    top.set_ylabel("decode tokens/s per device")
    low, high = min(tps), max(tps)
    top.set_ylim(low / 3, high * 30)

    costs = [cost_per_million(x, plan.price_per_hour) for x in tps]
    if plan.price_per_hour is not None:
        bottom.plot(batches, costs, "-o", color="#9467bd", ms=3, lw=2)
        bottom.set_ylabel(f"$ per million output tokens\n(at ${plan.price_per_hour:g}/device-hour)")
        bottom.set_yscale("log")
    else:
        bottom.text(0.5, 0.5, "no price: pass --price-per-hour", ha="center", va="center",
                    transform=bottom.transAxes)
    for ax in (top, bottom):
        ax.axvline(plan.batch, color="black", lw=1, ls=":")
        ax.axvline(plan.fit.max_batch(req.context), color="#d62728", lw=1, ls="-.")
        ax.grid(True, which="major", alpha=0.3)
    top.text(plan.batch, low / 2.8, f"plan: batch {plan.batch} ", fontsize=8, rotation=90, ha="right",
             va="bottom")
    top.text(plan.fit.max_batch(req.context), low / 2.8, f" cache full: {plan.fit.max_batch(req.context)}",
             fontsize=8, color="#d62728", rotation=90, ha="left", va="bottom")
    bottom.set_xscale("log", base=2)
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    top.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}" if y >= 1 else f"{y:g}"))
    if plan.price_per_hour is not None:
        bottom.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        bottom.yaxis.set_minor_locator(NullLocator())
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"${y:,.3g}"))
    bottom.set_xlabel(f"decode batch (sequences per device) at context {req.context}")
    par = req.parallelism
    top.set_title(f"{req.model_name} on {plan.request.hardware.name}, {plan.fmt} weights, "
                  f"{par.gpus} device(s) TP{par.tp} EP{par.ep}\n"
                  f"{req.efficiency.describe()}", fontsize=9)
    top.legend(loc="upper left", fontsize=8, ncol=2, framealpha=0.9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
