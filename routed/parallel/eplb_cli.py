"""`routed eplb`: an expert placement from a routing recording, and how much it balances the ranks.

`add_parser(subparsers)` registers the subcommand; `cmd_eplb(args)` runs it and returns the exit status.
Bad input (a file that is not a recording, counts that do not divide over the ranks) raises RoutedError,
which the `routed` entry point prints on one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from routed.argtypes import nonnegative_int, positive_int
from routed.errors import RoutedError

_EPILOG = """\
The load of each expert is its count of (token, choice) assignments summed over the whole recording. The contiguous placement (rank r
holds experts r*E/G .. (r+1)*E/G - 1, what plain expert parallelism does) is the baseline; the balanced one
gives --redundant extra slots per layer to the hottest experts (a replica takes an even share of its expert's
tokens) and packs the slots so the heaviest rank is as light as possible. max/mean = heaviest rank's predicted
load over the mean rank's: 1.00 is perfect, and the heaviest rank sets the layer's time. See docs/eplb.md.

examples:
  routed serve --model ckpt --record-routing routing.safetensors ...
  routed eplb --recording routing.safetensors --ranks 8 --redundant 8 --out placement.json
  routed eplb --recording routing.safetensors --ranks 32 --nodes 4 --redundant 32 --model ckpt --json
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eplb", help="place experts on ranks (with replicas of hot ones) from a routing recording",
        description="Expert-parallel load balancing: choose which experts get extra replicas and which rank "
                    "holds each, from the per-expert loads of a routing recording; compare the predicted rank "
                    "loads with the contiguous placement and write the placement for `--placement`.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recording", required=True, metavar="FILE",
                   help="a routing recording (`routed serve --record-routing`, `routed stats --save-recording`)")
    p.add_argument("--ranks", required=True, type=positive_int, metavar="G", help="expert-parallel ranks (devices)")
    p.add_argument("--nodes", type=positive_int, default=1, metavar="M",
                   help="nodes the ranks are spread over (default 1); >1 places expert groups on nodes first")
    p.add_argument("--redundant", type=nonnegative_int, default=0, metavar="R",
                   help="extra physical expert slots per layer, for replicas (default 0); experts + R must be "
                        "a multiple of --ranks")
    p.add_argument("--n-group", type=positive_int, default=None, metavar="N",
                   help="expert groups of the router (default: the --model's n_group, else 1)")
    p.add_argument("--model", metavar="PATH", help="checkpoint folder (or config.json): n_group and a shape check")
    p.add_argument("--out", metavar="FILE.json", help="write the balanced placement here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_eplb)


def cmd_eplb(args: argparse.Namespace) -> int:
    from routed.parallel.eplb import balanced_placement, contiguous_placement, imbalance
    from routed.telemetry import Recording

    rec = Recording.load(args.recording)
    if rec.counts_TLE.ndim != 3 or rec.counts_TLE.shape[0] == 0:
        raise RoutedError(f"{args.recording}: the recording holds no counts (shape {tuple(rec.counts_TLE.shape)})")
    load_LE = rec.counts_TLE.sum(0).double()
    L, E = load_LE.shape
    n_group = args.n_group
    if args.model:
        from routed.config import ModelConfig

        cfg = ModelConfig.from_pretrained(args.model)
        if cfg.n_routed_experts != E:
            raise RoutedError(f"{args.recording} has {E} experts per layer; {args.model} has "
                              f"{cfg.n_routed_experts}: not a recording of this model")
        n_group = n_group or cfg.n_group
    n_group = n_group or 1
    balanced = balanced_placement(load_LE, args.ranks, args.nodes, args.redundant, n_group, rec.layers)
    naive = contiguous_placement(E, L, args.ranks, rec.layers, args.nodes) if E % args.ranks == 0 else None
    bal_L = imbalance(balanced.rank_loads(load_LE))
    naive_L = imbalance(naive.rank_loads(load_LE)) if naive else None
    if args.out:
        balanced.save(args.out)
    hot = (load_LE.amax(-1) / load_LE.sum(-1).clamp(min=1)).tolist()
    rows = []
    for i, layer in enumerate(rec.layers):
        reps = balanced.replicas(i)
        rows.append({"layer": layer, "assignments": int(load_LE[i].sum()), "hottest_share": hot[i],
                     "contiguous": float(naive_L[i]) if naive_L is not None else None,
                     "balanced": float(bal_L[i]),
                     "replicated": {e: len(r) for e, r in enumerate(reps) if len(r) > 1}})
    summary = {"balanced": {"mean": float(bal_L.mean()), "worst": float(bal_L.max())},
               "contiguous": ({"mean": float(naive_L.mean()), "worst": float(naive_L.max())}
                              if naive_L is not None else None)}
    if args.json:
        print(json.dumps({"recording": str(args.recording), "ranks": args.ranks, "nodes": args.nodes,
                          "redundant": args.redundant, "n_group": n_group, "policy": balanced.policy,
                          "slots_per_rank": balanced.slots_per_rank, "layers": rows, "summary": summary,
                          "out": str(args.out) if args.out else None}))
        return 0
    _print(args, balanced, n_group, rows, summary)
    return 0


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _print(args: argparse.Namespace, balanced: Any, n_group: int, rows: list[dict], summary: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    how = {"flat": "flat over all ranks", "hierarchical": f"hierarchical ({n_group} groups over {args.nodes} nodes, "
                                                          "then ranks within each node)"}[balanced.policy]
    console.print(f"[bold]{escape(Path(args.recording).name)}[/bold]: {len(rows)} MoE layers x "
                  f"{balanced.num_logical} experts onto {args.ranks} ranks, {args.redundant} redundant slots "
                  f"per layer ({balanced.slots_per_rank} slots per rank); placement {how}")
    if args.nodes > 1 and balanced.policy == "flat":
        console.print(f"[dim]note: --n-group {n_group} is not a multiple of --nodes {args.nodes}; placed flat "
                      "(pass --model or --n-group for the hierarchical placement)[/dim]")
    t = Table("layer", "assignments", "hottest expert", "contiguous max/mean", "balanced max/mean", "replicated",
              title="Predicted rank load: heaviest rank / mean rank")
    for r in rows:
        n = r["replicated"]
        reps = f"{len(n)} (up to x{max(n.values())})" if n else "-"
        t.add_row(str(r["layer"]), f"{r['assignments']:,}", f"{r['hottest_share']:.1%}", _ratio(r["contiguous"]),
                  _ratio(r["balanced"]), reps)
    c, b = summary["contiguous"], summary["balanced"]
    t.add_section()
    t.add_row("mean", "", "", _ratio(c and c["mean"]), _ratio(b["mean"]), "")
    t.add_row("worst", "", "", _ratio(c and c["worst"]), _ratio(b["worst"]), "")
    console.print(t)
    if c is None:
        console.print(f"[dim]contiguous: n/a, {balanced.num_logical} experts do not split evenly over "
                      f"{args.ranks} ranks without redundant slots[/dim]")
    if args.out:
        console.print(f"wrote {args.out}")
