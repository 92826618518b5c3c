"""Expert-load balancing for training: the DeepSeek-V3 bias update and the sequence-wise auxiliary loss.

* `update_bias(bias_E, counts_E, gamma)`: auxiliary-loss-free balancing (spec §4.4). After each step,
  `b_i += γ · sign(mean_j load_j − load_i)` from the step's token counts: an under-loaded expert's bias
  goes up by γ, an over-loaded one's down by γ, an exactly average one stays. The bias is a buffer, never
  a gradient-trained parameter; it only shifts which experts are selected, not their gating weights.
* `sequence_balance_loss(logits_BTE, topk_BTK, top_k)`: the complementary sequence-wise loss (spec §4.5),
  `Σ_i f_i P_i` per sequence with `f_i = E/(K·T) · #tokens routed to i` (the actual routing map, as
  Megatron does; the indicator carries no gradient) and `P_i = mean_t s'_{i,t}`, `s'` the sigmoid scores
  normalised over all experts (softmax scores for V2-style routers). Mean over the batch's sequences;
  the caller multiplies by α and sums over MoE layers.
* `RouterTap`: forward hooks on every Gate that keep the router logits (with grad) and the chosen experts
  while `recording` is on, so the Gate code stays as inference needs it.
* `fp32_routers(model)`: makes each Gate run outside any autocast region, so bf16 autocast training keeps
  the router math and the correction bias in fp32 (spec §9 trap 1).

Shapes: B sequences, T tokens, N = B·T, E routed experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from routed.model.deepseek_v3 import Gate


def all_gates(model: nn.Module) -> list[Gate]:
    """Every router of the model, main layers first, then the MTP modules' (module order)."""
    return [m for m in model.modules() if isinstance(m, Gate)]


@torch.no_grad()
def update_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, gamma: float) -> None:
    """In place: b_i += γ · sign(mean load − load_i). γ = 0 leaves the bias untouched."""
    if gamma == 0:
        return
    load = counts_E.to(bias_E.dtype)
    bias_E.add_(gamma * torch.sign(load.mean() - load))


def sequence_balance_loss(logits_BTE: torch.Tensor, topk_BTK: torch.Tensor, scoring_func: str = "sigmoid"
                          ) -> torch.Tensor:
    """Σ_i f_i · P_i per sequence, averaged over sequences (fp32 scalar with grad through the logits)."""
    B, T, E = logits_BTE.shape
    K = topk_BTK.shape[-1]
    if scoring_func == "sigmoid":
        s = logits_BTE.float().sigmoid()
        s_norm = s / s.sum(-1, keepdim=True)
    else:
        s_norm = logits_BTE.float().softmax(-1)
    P_BE = s_norm.mean(1)
    with torch.no_grad():
        hits_BE = torch.zeros(B, E, dtype=torch.float32, device=logits_BTE.device)
        hits_BE.scatter_add_(1, topk_BTK.reshape(B, T * K), torch.ones(B, T * K, device=logits_BTE.device))
        f_BE = hits_BE * (E / (K * T))
    return (f_BE * P_BE).sum(-1).mean()


@dataclass(slots=True)
class RouterRecord:
    logits_NE: torch.Tensor
    topk_NK: torch.Tensor
    scoring_func: str


@dataclass(slots=True)
class RouterTap:
    """Keeps (logits, chosen experts) of every router call while `recording`; `clear()` between steps."""

    records: list[RouterRecord] = field(default_factory=list)
    recording: bool = False
    handles: list[RemovableHandle] = field(default_factory=list)

    @classmethod
    def attach(cls, model: nn.Module) -> RouterTap:
        tap = cls()
        for gate in all_gates(model):
            tap.handles.append(gate.register_forward_hook(tap._hook))
        return tap

    def _hook(self, gate: nn.Module, _inputs: tuple, output: tuple[torch.Tensor, ...]) -> None:
        if self.recording:
            topk_ids, _weights, logits = output
            self.records.append(RouterRecord(logits, topk_ids, gate.scoring_func))

    def balance_loss(self, batch_rows: int) -> torch.Tensor:
        """Σ over recorded router calls of the sequence-wise loss (each call's N tokens = batch_rows rows)."""
        total = torch.zeros((), dtype=torch.float32)
        for r in self.records:
            N, E = r.logits_NE.shape
            T = N // batch_rows
            total = total + sequence_balance_loss(r.logits_NE.view(batch_rows, T, E),
                                                  r.topk_NK.view(batch_rows, T, -1), r.scoring_func)
        return total

    def clear(self) -> None:
        self.records.clear()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def fp32_routers(model: nn.Module) -> None:
    """Run every Gate with autocast off (its own code upcasts to fp32); a no-op outside autocast."""
    for gate in all_gates(model):
        def forward(x_ND: torch.Tensor, _gate: Gate = gate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.autocast(x_ND.device.type, enabled=False):
                return Gate.forward(_gate, x_ND)

        gate.forward = forward  # type: ignore[method-assign]


def read_and_reset_counts(gates: list[Gate]) -> torch.Tensor:
    """Tokens per expert for each router since the last reset, [L, E] int64; the counters restart at zero."""
    counts = torch.stack([g.expert_counts.clone() for g in gates]) if gates else torch.zeros(0, 0, dtype=torch.long)
    for g in gates:
        g.reset_counters()
    return counts
