"""Routed-expert execution for one MoE layer: a reference loop and the grouped fast path.

Contract: `RoutedExperts(x_ND, topk_ids_NK, topk_weights_NK, impl)` returns `(y_ND, counts_E)` where
`y[n] = Σ_k w[n,k] · Expert_{ids[n,k]}(x[n])` accumulated in fp32 and cast to x's dtype, and `counts[e]` is
the number of (token, slot) pairs routed to expert e (for telemetry).

Legend: N tokens, K experts per token, E routed experts, D hidden size, I expert intermediate size.
Weights are stacked per layer — `gate_proj_EID`, `up_proj_EID`, `down_proj_EDI` — filled at load from the
checkpoint's `mlp.experts.{e}.{gate,up,down}_proj.weight` (the loader's name table does the restacking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_IMPLS = ("grouped", "reference")


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) ⊙ up(x)) with weights stored [out, in]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class RoutedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        E, D, I = num_experts, hidden_size, intermediate_size
        self.num_experts = E
        self.gate_proj = nn.Parameter(torch.empty(E, I, D, dtype=dtype), requires_grad=False)
        self.up_proj = nn.Parameter(torch.empty(E, I, D, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, D, I, dtype=dtype), requires_grad=False)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])

    def forward(
        self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor, impl: str = "grouped"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        counts_E = torch.bincount(topk_ids_NK.flatten(), minlength=self.num_experts)
        if impl == "grouped":
            y = self._grouped(x_ND, topk_ids_NK, topk_weights_NK, counts_E)
        elif impl == "reference":
            y = self._reference(x_ND, topk_ids_NK, topk_weights_NK)
        else:
            raise ValueError(f"unknown expert impl {impl!r}; choose from {EXPERT_IMPLS}")
        return y.to(x_ND.dtype), counts_E

    def _reference(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Slow twin: every (token, slot) pair on its own."""
        out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        for n in range(x_ND.shape[0]):
            for k in range(ids_NK.shape[1]):
                e = int(ids_NK[n, k])
                out[n] += self.expert(e, x_ND[n : n + 1])[0].float() * w_NK[n, k].float()
        return out

    def _grouped(
        self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """Sort the (token, slot) pairs by expert; run each chosen expert once on all of its tokens."""
        K = ids_NK.shape[1]
        order = ids_NK.flatten().argsort(stable=True)
        token_of = order // K
        x_sorted = x_ND[token_of]
        w_sorted = w_NK.flatten()[order].float().unsqueeze(-1)
        out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        start = 0
        for e, count in enumerate(counts_E.tolist()):
            if count == 0:
                continue
            end = start + count
            y = self.expert(e, x_sorted[start:end])
            out.index_add_(0, token_of[start:end], y.float() * w_sorted[start:end])
            start = end
        return out
