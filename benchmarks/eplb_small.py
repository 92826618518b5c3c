"""The tables and the figure of docs/eplb.md: EPLB on a routing recording, contiguous vs balanced placement.

    python benchmarks/eplb_small.py --recording docs/eplb_small_argparse.safetensors --plot docs/eplb_small.png

Prints Markdown: predicted max/mean rank load (mean over layers / worst layer) for ranks x redundant slots,
fitted on the whole recording and, to see how a placement ages, fitted on the first half of the windows and
scored on the second half.
"""

from __future__ import annotations

import argparse
import time

import torch

from routed.parallel.eplb import balanced_placement, contiguous_placement, imbalance
from routed.telemetry import Recording


def score(placement, load_LE: torch.Tensor) -> str:
    imb = imbalance(placement.rank_loads(load_LE))
    return f"{float(imb.mean()):.3f} / {float(imb.max()):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recording", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--n-group", type=int, default=8)
    args = ap.parse_args()
    rec = Recording.load(args.recording)
    T = rec.counts_TLE.shape[0]
    all_LE = rec.counts_TLE.sum(0).double()
    first_LE, second_LE = rec.counts_TLE[: T // 2].sum(0).double(), rec.counts_TLE[T // 2 :].sum(0).double()
    L, E = all_LE.shape
    print(f"{L} MoE layers x {E} experts, {T} windows, {int(rec.tokens_T.sum())} tokens, top-{rec.top_k}\n")
    print("| ranks | nodes | redundant | contiguous | balanced (fit on all) | contiguous, 2nd half | "
          "balanced fit on 1st half, scored on 2nd |")
    print("|---|---|---|---|---|---|---|")
    for ranks, nodes, redundants in ((2, 1, (0, 8, 16)), (4, 1, (0, 8, 16)), (8, 1, (0, 8, 16)),
                                     (8, 2, (0, 8, 16)), (16, 1, (0, 16, 32))):
        naive = contiguous_placement(E, L, ranks, rec.layers)
        for redundant in redundants:
            t0 = time.perf_counter()
            fit_all = balanced_placement(all_LE, ranks, nodes, redundant, args.n_group, rec.layers)
            took = time.perf_counter() - t0
            fit_first = balanced_placement(first_LE, ranks, nodes, redundant, args.n_group, rec.layers)
            print(f"| {ranks} | {nodes}{' (hier.)' if fit_all.policy == 'hierarchical' else ''} | {redundant} | "
                  f"{score(naive, all_LE)} | {score(fit_all, all_LE)} | {score(naive, second_LE)} | "
                  f"{score(fit_first, second_LE)} |  <!-- {took * 1e3:.0f} ms -->")
    if args.plot:
        plot(all_LE, first_LE, second_LE, rec.layers, args.plot)


def plot(load_LE: torch.Tensor, first_LE: torch.Tensor, second_LE: torch.Tensor, layers: list[int],
         path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, E = load_LE.shape
    ranks = 16
    naive = contiguous_placement(E, L, ranks, layers)
    worst = int(imbalance(naive.rank_loads(load_LE)).argmax())
    panels = [("contiguous", naive, load_LE),
              ("balanced, 0 redundant", balanced_placement(load_LE, ranks, layers=layers), load_LE),
              ("balanced, 16 redundant", balanced_placement(load_LE, ranks, redundant=16, layers=layers), load_LE),
              ("16 redundant, fit on 1st half,\nscored on 2nd half",
               balanced_placement(first_LE, ranks, redundant=16, layers=layers), second_LE)]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), sharey=True)
    for ax, (name, p, load) in zip(axes, panels):
        rl = p.rank_loads(load)[worst]
        rel = rl / rl.mean()
        ax.bar(range(ranks), rel.tolist(), color="tab:blue" if name == "contiguous" else "tab:green")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"{name}: max/mean {float(rel.max()):.2f}", fontsize=9)
        ax.set_xlabel("rank")
        ax.set_xticks(range(0, ranks, 3))
    axes[0].set_ylabel("predicted load / mean")
    fig.suptitle(f"small checkpoint on argparse.py, MoE layer {layers[worst]} (worst for contiguous), {ranks} ranks",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
