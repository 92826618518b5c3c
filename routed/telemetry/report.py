"""`routed stats`: routing counts over a text (or from a recording) -> pictures and a Markdown summary.

Pictures (PNG, matplotlib, readable at a glance for 61 layers x 256 experts):
* `routing_heatmap.png`  layers x experts, each cell the expert's load relative to an even share (log2; white
                         = even, red = hot, blue = cold, black = dead);
* `routing_balance.png`  MaxVio per layer, dead-expert counts marked;
* `routing_over_time.png` MaxVio per layer over the recorded windows (worst and mean on top).
"""

from __future__ import annotations

from pathlib import Path

import torch

from routed.model.deepseek_v3 import Transformer
from routed.progress import progress_bar
from routed.telemetry.health import HealthConfig, check
from routed.telemetry.measures import Counts, LayerMeasures, max_vio, measure
from routed.telemetry.monitor import Recording, RoutingMonitor


def record_text(model: Transformer, token_ids: list[int], chunk_tokens: int = 256) -> tuple[Recording, Counts]:
    """Run the model over the tokens in chunks; one recorded window per chunk."""
    monitor = RoutingMonitor(model)
    monitor.read_step()  # drop anything counted before
    windows, total = [], None
    starts = range(0, len(token_ids), chunk_tokens)
    with torch.inference_mode(), progress_bar("routing over the text", total=len(starts)) as advance:
        for start in starts:
            model.forward_hidden(torch.tensor([token_ids[start : start + chunk_tokens]]))
            step = monitor.read_step()
            windows.append(step)
            total = step if total is None else total + step
            advance()
    rec = Recording(torch.stack([w.experts_LE for w in windows]), torch.tensor([w.tokens for w in windows]),
                    torch.arange(len(windows), dtype=torch.float64), monitor.layers, monitor.top_k)
    return rec, total


def _relative_load(counts_LE: torch.Tensor) -> torch.Tensor:
    share = counts_LE.double() / counts_LE.sum(-1, keepdim=True).clamp(min=1)
    return share * counts_LE.shape[-1]


def plot_heatmap(counts_LE: torch.Tensor, layers: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L, E = counts_LE.shape
    rel = _relative_load(counts_LE).numpy()
    data = np.ma.masked_where(rel == 0, np.log2(np.where(rel == 0, 1, rel)))
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("black")
    sorted_rel = -np.sort(-rel, axis=1)
    sorted_data = np.ma.masked_where(sorted_rel == 0, np.log2(np.where(sorted_rel == 0, 1, sorted_rel)))
    fig, (ax, ax_sorted) = plt.subplots(1, 2, figsize=(min(18, 6 + E / 16), min(12, 2.2 + L * 0.16)),
                                        gridspec_kw={"width_ratios": [2, 1]}, sharey=True)
    im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=-3, vmax=3, interpolation="nearest")
    ax_sorted.imshow(sorted_data, aspect="auto", cmap=cmap, vmin=-3, vmax=3, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    ax_sorted.set_xlabel("experts sorted by load, per layer")
    ax_sorted.set_title("load profile (even = all white)")
    step = max(1, L // 16)
    ax.set_yticks(range(0, L, step), [str(layers[i]) for i in range(0, L, step)])
    bar = fig.colorbar(im, ax=[ax, ax_sorted], fraction=0.03, pad=0.01)
    bar.set_ticks([-3, -2, -1, 0, 1, 2, 3], labels=["1/8", "1/4", "1/2", "even", "2x", "4x", "≥8x"])
    bar.set_label("load vs an even share (black = no token)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_balance(measures: list[LayerMeasures], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(16, 3 + len(measures) * 0.22), 4))
    xs = range(len(measures))
    ax.bar(xs, [m.max_vio for m in measures], color="tab:blue", label="MaxVio")
    top = max((m.max_vio for m in measures), default=1.0) or 1.0
    ax.set_ylim(0, top * 1.25)
    for x, m in zip(xs, measures):
        if m.dead:  # dead-expert count written above the bar
            ax.text(x, m.max_vio + top * 0.02, str(m.dead), ha="center", va="bottom", fontsize=7, color="tab:red")
    if any(m.dead for m in measures):
        ax.text(0.99, 0.98, "red numbers: dead experts", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color="tab:red")
    step = max(1, len(measures) // 30)
    ax.set_xticks(list(xs)[::step], [str(m.layer) for m in measures][::step])
    ax.set_xlabel("layer")
    ax.set_ylabel("MaxVio = max load / mean load − 1")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_over_time(rec: Recording, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mv_TL = torch.stack([max_vio(c) for c in rec.counts_TLE]).numpy()  # [T, L]
    x = rec.tokens_T.cumsum(0).numpy()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 2]})
    top.plot(x, mv_TL.max(1), label="worst layer", color="tab:red")
    top.plot(x, mv_TL.mean(1), label="mean over layers", color="tab:blue")
    top.set_ylabel("MaxVio per window")
    top.legend(loc="upper right")
    top.grid(alpha=0.3)
    top.set_title(title)
    im = bottom.imshow(mv_TL.T, aspect="auto", cmap="magma", interpolation="nearest",
                       extent=(0, float(x[-1]), len(rec.layers) - 0.5, -0.5))
    L = len(rec.layers)
    step = max(1, L // 12)
    bottom.set_yticks(range(0, L, step), [str(rec.layers[i]) for i in range(0, L, step)])
    bottom.set_ylabel("layer")
    bottom.set_xlabel("tokens")
    fig.colorbar(im, ax=bottom, fraction=0.03, pad=0.01, label="MaxVio")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(measures: list[LayerMeasures], alerts: list, rec: Recording, title: str) -> str:
    lines = [f"# Routing report: {title}", "",
             f"{int(rec.tokens_T.sum())} tokens in {len(rec.tokens_T)} windows, {len(rec.layers)} MoE layers, "
             f"{rec.counts_TLE.shape[-1]} routed experts, top-{rec.top_k}.", ""]
    if measures:
        worst = max(measures, key=lambda m: m.max_vio)
        mean_mv = sum(m.max_vio for m in measures) / len(measures)
        lines += [f"Model: mean MaxVio {mean_mv:.3f}, worst layer {worst.layer} ({worst.max_vio:.3f}); "
                  f"dead experts in total {sum(m.dead for m in measures)}.", ""]
    lines += ["## Alerts", ""]
    lines += [f"- **{a.kind}** — {a.message}" for a in alerts] or ["None."]
    lines += ["", "## Per layer", "", "| layer | tokens | MaxVio | CV | entropy | dead | gate margin | top-k mass |",
              "|---|---|---|---|---|---|---|---|"]
    for m in measures:
        lines.append(f"| {m.layer} | {m.tokens} | {m.max_vio:.3f} | {m.cv:.3f} | {m.entropy:.3f} | {m.dead} | "
                     f"{m.gate_margin:.4f} | {m.topk_mass:.3f} |")
    lines += ["", "Pictures: `routing_heatmap.png`, `routing_balance.png`, `routing_over_time.png`.", ""]
    return "\n".join(lines)


def write_report(rec: Recording, out: Path, title: str, total: Counts | None = None) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    counts_LE = rec.counts_TLE.sum(0)
    if total is None:
        L, E = counts_LE.shape
        stats = torch.zeros(L, 4, dtype=torch.float64)
        stats[:, 0] = float(rec.tokens_T.sum())
        stats[:, 1:3] = float("nan")  # a recording holds counts only: no margins or score mass
        total = Counts(counts_LE, counts_LE.double(), torch.zeros(L, 1, dtype=torch.long), stats)
    measures = measure(total, rec.layers)
    alerts = check(total, measures, rec.top_k, HealthConfig())
    paths = {"heatmap": out / "routing_heatmap.png", "balance": out / "routing_balance.png",
             "over_time": out / "routing_over_time.png", "summary": out / "routing_summary.md"}
    plot_heatmap(counts_LE, rec.layers, paths["heatmap"], f"{title}: expert load")
    plot_balance(measures, paths["balance"], f"{title}: balance per layer")
    plot_over_time(rec, paths["over_time"], f"{title}: balance over time")
    paths["summary"].write_text(summary_markdown(measures, alerts, rec, title))
    return {k: str(v) for k, v in paths.items()}
