"""The DeepSeek-V3 balance result, reproduced small: bias update vs auxiliary loss vs neither.

Trains the same small model (MLA + 16 routed experts, top-4 in 2 of 4 groups, one shared expert) three
times on the same data, steps and seed:

    bias      auxiliary-loss-free balancing only (γ > 0, α = 0)
    aux       sequence-wise balance loss only   (γ = 0, α > 0)
    neither   (γ = 0, α = 0)

and reports final validation loss and MaxVio (per layer on the whole validation set, and on training
batches over the last 10% of steps) side by side, with a chart of the training-batch MaxVio over steps.

    python benchmarks/balance_experiment.py --out /tmp/balance --steps 800 --seeds 0,1 --threads 1

writes the runs under --out/seed{n}/{bias,aux,neither}, `--out/results.json`, and the chart (first seed)
to docs/balance_maxvio.png (--png). The first run trains the BPE tokenizer; the others reuse it so every
run sees identical token streams. Validation is the whole held-out split (`val_tokens` 1M > its size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routed.presets import PRESETS  # noqa: E402
from routed.train import TrainConfig, train  # noqa: E402

MODEL = {
    **{k: PRESETS["demo"][k] for k in ("architectures", "model_type", "hidden_act", "topk_method", "scoring_func",
                                        "norm_topk_prob", "moe_layer_freq", "rms_norm_eps", "rope_theta",
                                        "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id")},
    "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 16, "num_experts_per_tok": 4,
    "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "num_nextn_predict_layers": 0,
    "max_position_embeddings": 1024,
}


def runs(gamma: float, alpha: float) -> dict[str, dict[str, float]]:
    return {"bias": {"gamma": gamma, "alpha": 0.0}, "aux": {"gamma": 0.0, "alpha": alpha},
            "neither": {"gamma": 0.0, "alpha": 0.0}}


def read_metrics(folder: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot(results: dict[str, dict], out_png: Path, window: int) -> None:
    """Training-batch MaxVio over steps, one line per run (results: name -> one seed's summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"bias": "tab:green", "aux": "tab:blue", "neither": "tab:red"}
    for name, res in results.items():
        steps, mv = res["steps"], res["max_vio_per_step"]
        ax.plot(steps, mv, color=colors[name], alpha=0.15, linewidth=0.8)
        ax.plot(steps, smooth(mv, window), color=colors[name], linewidth=2, label=f"{name} ({res['label']})")
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio of the step's batch (mean over MoE layers)")
    ax.set_yscale("log")
    ax.set_title("Expert-load balance while training (faint: per step; bold: moving mean)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)


def run_one(folder: Path, cfg: TrainConfig, data: str, tokenizer: Path | None) -> dict:
    """Train (or reuse a finished run in `folder`) and summarise it from its metrics.jsonl."""
    state = folder / "training_state.json"
    if not (state.is_file() and json.loads(state.read_text())["step"] >= cfg.steps):
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished run: start it again
        train(folder, cfg, model_config=MODEL, data=data, tokenizer=tokenizer, progress=True)
    steps, evals = read_metrics(folder)
    final = evals[-1]["eval"]
    tail = steps[-max(len(steps) // 10, 1):]
    return {
        "val_loss": final["loss"], "val_max_vio": final["max_vio"], "val_max_vio_layers": final["max_vio_layers"],
        "train_max_vio_last10pct": statistics.fmean(r["max_vio"] for r in tail),
        "train_main_loss_last10pct": statistics.fmean(r["main"] for r in tail),
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps),
        "steps": [r["step"] for r in steps], "max_vio_per_step": [r["max_vio"] for r in steps],
        "evals": [{"step": e["step"], **{k: e["eval"][k] for k in ("loss", "max_vio")}} for e in evals],
    }


def table(results: dict[str, dict], seeds: list[int]) -> str:
    lines = ["| run | γ | α | seed | val loss | val MaxVio (per layer) | train-batch MaxVio, last 10% |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for seed in seeds:
            x = r["seeds"][str(seed)]
            layers = ", ".join(f"{v:.2f}" for v in x["val_max_vio_layers"])
            lines.append(f"| {name} | {r['gamma']:g} | {r['alpha']:g} | {seed} | {x['val_loss']:.4f} | "
                         f"{x['val_max_vio']:.3f} ({layers}) | {x['train_max_vio_last10pct']:.3f} |")
        if len(seeds) > 1:
            mean = {k: statistics.fmean(r["seeds"][str(s)][k] for s in seeds)
                    for k in ("val_loss", "val_max_vio", "train_max_vio_last10pct")}
            lines.append(f"| **{name}** | | | mean | **{mean['val_loss']:.4f}** | **{mean['val_max_vio']:.3f}** | "
                         f"**{mean['train_max_vio_last10pct']:.3f}** |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs and results.json (finished runs are reused)")
    p.add_argument("--data", default="stdlib", help="training data (default: the Python standard library)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gamma", type=float, default=2e-3, help="bias update speed of the `bias` run")
    p.add_argument("--alpha", type=float, default=1e-2, help="balance-loss weight of the `aux` run")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; each seed trains all three runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--png", default=str(ROOT / "docs" / "balance_maxvio.png"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seeds = [int(x) for x in args.seeds.split(",")]
    results: dict[str, dict] = {name: {**knobs, "label": f"γ={knobs['gamma']:g}, α={knobs['alpha']:g}", "seeds": {}}
                                for name, knobs in runs(args.gamma, args.alpha).items()}
    tokenizer = None  # the first run trains it; all others reuse it, so every run sees the same token streams
    for seed in seeds:
        for name, knobs in runs(args.gamma, args.alpha).items():
            folder = out / f"seed{seed}" / name
            cfg = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=50,
                              mtp_lambda=0.0, seed=seed, eval_every=max(args.steps // 4, 1),
                              save_every=args.steps, log_every=50, val_tokens=1 << 20, **knobs)
            t0 = time.perf_counter()
            res = run_one(folder, cfg, args.data, tokenizer)
            tokenizer = tokenizer or folder
            results[name]["seeds"][str(seed)] = {**res, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"seed {seed} {name}: val loss {res['val_loss']:.4f}  val MaxVio {res['val_max_vio']:.3f}",
                  file=sys.stderr)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot({name: {**r["seeds"][str(seeds[0])], "label": r["label"]} for name, r in results.items()},
         Path(args.png), window=max(args.steps // 30, 5))
    print(table(results, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
