"""`routed train`: the command-line face of routed.train. Registered by routed.cli through `add_parser`.

Errors a user can cause raise RoutedError (routed.cli prints them on one line and exits 1). With `--json`
one JSON object (the TrainResult) goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

# flag -> (TrainConfig field, type, help); default None = the TrainConfig default (or the stored one on --resume)
_SETTINGS: list[tuple[str, str, type, str]] = [
    ("--seq-len", "seq_len", int, "tokens per training window (default 256)"),
    ("--batch", "batch", int, "windows per step (default 16)"),
    ("--lr", "lr", float, "peak learning rate of AdamW (default 2e-3)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate / peak, end of the cosine (default 0.1)"),
    ("--warmup", "warmup", int, "linear warmup steps (default 100)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on matrices (default 0.1)"),
    ("--grad-clip", "grad_clip", float, "clip the gradient norm to this; 0 = off (default 1.0)"),
    ("--gamma", "gamma", float, "bias update speed of auxiliary-loss-free balancing; 0 = off (default 1e-3)"),
    ("--alpha", "alpha", float, "weight of the sequence-wise balance loss; 0 = off (default 0)"),
    ("--mtp-lambda", "mtp_lambda", float, "weight of the multi-token-prediction loss; 0 = off (default 0.3)"),
    ("--seed", "seed", int, "seed for the initial weights and the data windows (default 0)"),
    ("--vocab-size", "vocab_size", int, "size of the BPE trained when --tokenizer is not given "
                                        "(default: the config's vocab_size)"),
    ("--glob", "glob", str, "files of a --data folder to read (default '**/*.py')"),
    ("--val-every", "val_every", int, "hold out every n-th file for validation (default 20)"),
    ("--val-tokens", "val_tokens", int, "validation tokens per evaluation (default 32768)"),
    ("--eval-every", "eval_every", int, "evaluate every n steps (default 250)"),
    ("--save-every", "save_every", int, "save the checkpoint and state every n steps (default 500)"),
    ("--log-every", "log_every", int, "print a line every n steps when stderr is not a terminal (default 10)"),
    ("--init-std", "init_std", float, "standard deviation of the initial weights (default 0.02)"),
]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    t = subparsers.add_parser(
        "train", help="train a small DeepSeek-V3-architecture model (MLA, MoE, MTP) on text files",
        description="Train from scratch with the engine's model code: AdamW, warmup + cosine, gradient clipping, "
                    "auxiliary-loss-free balancing (bias update, --gamma), optional sequence-wise balance loss "
                    "(--alpha), MTP loss (--mtp-lambda). Writes a Hugging Face checkpoint folder (config.json, "
                    "model.safetensors, tokenizer files) that routed and transformers load, plus the state "
                    "--resume continues from. Example (the bundled demo model): routed train --config demo "
                    "--data stdlib --steps 1200 --out runs/demo --threads 1")
    t.add_argument("--config", help="preset name (e.g. demo, tiny) or a config.json file / folder")
    t.add_argument("--data", help="a text file, a folder (files matching --glob), or 'stdlib' for the Python "
                                  "standard library's own source")
    t.add_argument("--tokenizer", default=None,
                   help="folder with tokenizer.json to use; default: train a byte-level BPE on the data")
    t.add_argument("--steps", type=int, required=True, help="total optimizer steps (with --resume: the new total)")
    t.add_argument("--out", required=True, help="output folder (new, or the run to --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its saved state")
    t.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="compute precision: fp32, or bf16 autocast over fp32 master weights (default bf16)")
    t.add_argument("--save-dtype", choices=["fp32", "bf16"], default=None,
                   help="dtype of model.safetensors (default bf16)")
    for flag, _name, kind, text in _SETTINGS:
        t.add_argument(flag, type=kind, default=None, help=text)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    t.set_defaults(func=cmd_train)
    return t


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, name) for _flag, name, _kind, _text in _SETTINGS if getattr(args, name) is not None}
    for name in ("dtype", "save_dtype"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    given["steps"] = args.steps
    return given


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from routed.train.trainer import TrainConfig, train

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    given = _explicit(args)
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in known})
    result = train(args.out, cfg, model_config=args.config, data=args.data, tokenizer=args.tokenizer,
                   resume=args.resume, overrides=given, progress=True)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        val = result.val
        print(f"trained {result.step} steps ({result.tokens:,} tokens, {result.seconds:.0f}s, "
              f"{result.tokens_per_second:,.0f} tok/s); validation loss {val['loss']:.4f} (MTP {val['mtp']:.4f}), "
              f"MaxVio {val['max_vio']:.3f}; checkpoint in {result.out}", file=sys.stderr)
    return 0
