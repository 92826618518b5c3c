"""`routed compare-routing`: did a quantization (or a fine-tune) silently re-route the model?

Both models run over the same token chunks; forward hooks on every router capture each token's top-k expert
set. Per MoE layer: the fraction of tokens whose set is identical, and the mean overlap |A ∩ B| / k. Over the
output: the mean KL divergence KL(P_reference || P_model) of next-token distributions, in nats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from routed.errors import RoutedError
from routed.model.deepseek_v3 import Transformer
from routed.progress import progress_bar


@dataclass(slots=True)
class RoutingComparison:
    layers: list[int]
    identical: list[float]  # per layer: fraction of tokens with the same top-k set
    overlap: list[float]  # per layer: mean |A ∩ B| / k
    kl: float  # mean KL(reference || model) per token, nats
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def _capture(model: Transformer) -> tuple[list, list[list[torch.Tensor]]]:
    seen: list[list[torch.Tensor]] = [[] for _ in model.gates()]
    hooks = [gate.register_forward_hook(lambda _m, _i, out, i=i: seen[i].append(out[0].sort(-1).values))
             for i, (_, gate) in enumerate(model.gates())]
    return hooks, seen


def compare_routing(model: Transformer, reference: Transformer, token_ids: list[int],
                    chunk_tokens: int = 256) -> RoutingComparison:
    a, b = model.config, reference.config
    if (a.num_hidden_layers, a.n_routed_experts, a.num_experts_per_tok, a.vocab_size) != (
            b.num_hidden_layers, b.n_routed_experts, b.num_experts_per_tok, b.vocab_size):
        raise RoutedError("the two checkpoints differ in layers, experts, top-k or vocabulary; "
                          "compare-routing needs the same architecture")
    hooks_a, seen_a = _capture(model)
    hooks_b, seen_b = _capture(reference)
    kl_sum, n = 0.0, 0
    starts = range(0, len(token_ids), chunk_tokens)
    try:
        with torch.inference_mode(), progress_bar("comparing routing", total=len(starts)) as advance:
            for start in starts:
                ids = torch.tensor([token_ids[start : start + chunk_tokens]])
                logp = model(ids).log_softmax(-1)
                logq = reference(ids).log_softmax(-1)
                kl_sum += float((logq.exp() * (logq - logp)).sum())
                n += ids.shape[1]
                advance()
    finally:
        for h in hooks_a + hooks_b:
            h.remove()
    k = a.num_experts_per_tok
    identical, overlap = [], []
    for ta, tb in zip(seen_a, seen_b):
        A, B = torch.cat(ta), torch.cat(tb)
        identical.append(float((A == B).all(-1).double().mean()))
        common = (A.unsqueeze(-1) == B.unsqueeze(-2)).any(-1).sum(-1)
        overlap.append(float(common.double().mean() / k))
    return RoutingComparison([layer for layer, _ in model.gates()], identical, overlap, kl_sum / max(n, 1), n)
