"""Training-time twin of the grouped expert path: same results, a cheaper backward.

The inference path (`RoutedExperts._grouped`) indexes the stacked weights per expert (`gate_proj[e]`); in
training every such index has a backward that materialises a zero tensor the size of the whole stack, so a
layer pays E full-size fills and adds per projection, and slicing the sorted tokens per expert costs the
same again. Here the stacks are `unbind`-ed and the tokens `split` once per forward (one stacked gradient
each), the expert outputs are concatenated, and one `index_add_` scatters them back. Each token's terms
are summed in the inference path's order (by expert), so the outputs are identical (tests/test_train.py).

Legend: N tokens, K experts per token, E experts, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routed.model.experts import RoutedExperts


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) ⊙ up(x)) with weights stored [out, in], as `RoutedExperts.expert` computes it."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def grouped_for_training(experts: RoutedExperts, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor,
                         counts_E: torch.Tensor) -> torch.Tensor:
    """fp32 [N, D]: Σ_k w[n,k] · Expert_{ids[n,k]}(x[n])."""
    K = ids_NK.shape[1]
    order = ids_NK.flatten().argsort(stable=True)
    token_of = order // K
    x_sorted = x_ND[token_of]
    w_sorted = w_NK.flatten()[order].float().unsqueeze(-1)
    gate, up, down = experts.gate_proj.unbind(0), experts.up_proj.unbind(0), experts.down_proj.unbind(0)
    counts = counts_E.tolist()
    parts = x_sorted.split(counts)  # one backward for all experts (slicing would pay one full-size zero fill each)
    outs = [swiglu(parts[e], gate[e], up[e], down[e]) for e, count in enumerate(counts) if count]
    y_sorted = torch.cat(outs).float() * w_sorted
    return torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device).index_add_(0, token_of, y_sorted)


def use_training_experts(model: nn.Module) -> None:
    """Route every (unquantized) RoutedExperts' grouped path through `grouped_for_training`."""
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            def grouped(x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor, counts_E: torch.Tensor,
                        _experts: RoutedExperts = module) -> torch.Tensor:
                return grouped_for_training(_experts, x_ND, ids_NK, w_NK, counts_E)

            module._grouped = grouped  # type: ignore[method-assign]
