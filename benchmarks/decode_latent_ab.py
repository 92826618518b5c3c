"""Decode at batch 1 in one process, interleaved: the compiled step's attention over the cached latents in
fp32 (routed's `_latent_matmuls`) against the same products in bf16 (before: a context grows by one key per
step, so each step's two bf16 products have a shape oneDNN has not seen, and it builds a kernel for it).

    python benchmarks/decode_latent_ab.py --model checkpoints/small --rounds 6 [--quant int8|int4] [--prompt-len 1000]
"""

from __future__ import annotations


import torch

from compiled_plans import compare, plan_with, setup  # benchmarks/compiled_plans.py
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
    before = plan_with(model, attention, "_latent_matmuls", bf16_latent_matmuls)
    compare(args, engine, before, model._one_token_plan, ("bf16 matmuls", "fp32 matmuls"))


if __name__ == "__main__":
    main()
