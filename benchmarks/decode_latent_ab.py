"""Decode at batch 1 in one process, interleaved: the compiled step's attention over the cached latents in
fp32 (routed's `_latent_matmuls`) against the same products in bf16 (before: a context grows by one key per
step, so each step's two bf16 products have a shape oneDNN has not seen, and it builds a kernel for it).

    python benchmarks/decode_latent_ab.py --model checkpoints/small --rounds 6 [--quant int8|int4] [--prompt-len 1000]
"""

from __future__ import annotations

import json
import random
import statistics

import torch

from compiled_plans import interleaved, plan_with, setup  # benchmarks/compiled_plans.py
from routed.model import attention


def bf16_latent_matmuls(scale: float, q_BTHC: torch.Tensor, latent_BSC: torch.Tensor, L: int,
                        mask_BTS: torch.Tensor) -> torch.Tensor:
    """`attention._latent_matmuls` before: bf16 products, scores widened after the first."""
    scores_BHTS = torch.einsum("bthc,bsc->bhts", q_BTHC, latent_BSC).float() * scale
    probs_BHTS = attention._masked_softmax(scores_BHTS, mask_BTS).to(latent_BSC.dtype)
    return torch.einsum("bhts,bsx->bthx", probs_BHTS, latent_BSC[..., :L])


def main() -> None:
    args, engine, _ = setup(__doc__.splitlines()[0])
    model = engine.model
    plans = {"bf16 matmuls": plan_with(model, attention, "_latent_matmuls", bf16_latent_matmuls),
             "fp32 matmuls": model._one_token_plan}
    rates = interleaved(engine, plans, args.rounds, args.gen_len, random.Random(0), args.prompt_len)
    a, b = plans
    print(json.dumps({"quant": args.quant or "bf16", "prompt_len": args.prompt_len, "gen_len": args.gen_len, "threads": args.threads,
                      "decode_b1_tok_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()},
                      "all": {k: " ".join(f"{x:.1f}" for x in v) for k, v in rates.items()},
                      "ratio (median of rounds)": {f"{b} / {a}": round(statistics.median(
                          y / x for x, y in zip(rates[a], rates[b])), 3)}}, indent=2))


if __name__ == "__main__":
    main()
