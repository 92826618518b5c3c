"""Routing counts over a window, and the balance measures computed from them (pure functions).

`Counts` holds, per MoE layer (L) and routed expert (E): tokens routed to each expert, their summed routing
weight, tokens per expert group (G), and per-layer sums (tokens, gate margin, top-k score mass, non-finite
router logits). Counts add and subtract, so windows are running sums of per-step deltas.

Measures per layer: load share, MaxVio = max load / mean load − 1 (DeepSeek's balance measure), coefficient
of variation, entropy normalised to [0, 1], dead experts (no token), group usage, mean gate margin between
the k-th and (k+1)-th biased score, mean top-k share of the score mass; Jensen–Shannon divergence for drift.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

STAT_TOKENS, STAT_MARGIN, STAT_MASS, STAT_NONFINITE = range(4)


@dataclass(slots=True)
class Counts:
    experts_LE: torch.Tensor  # int64 tokens per expert
    weight_LE: torch.Tensor  # float64 summed routing weight per expert
    groups_LG: torch.Tensor  # int64 tokens per expert group
    stats_L4: torch.Tensor  # float64 (tokens, Σ margin, Σ top-k mass, non-finite logits)

    @classmethod
    def zeros(cls, L: int, E: int, G: int) -> Counts:
        return cls(torch.zeros(L, E, dtype=torch.long), torch.zeros(L, E, dtype=torch.float64),
                   torch.zeros(L, G, dtype=torch.long), torch.zeros(L, 4, dtype=torch.float64))

    @property
    def tokens(self) -> int:
        return int(self.stats_L4[:, STAT_TOKENS].max()) if self.stats_L4.numel() else 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.experts_LE + other.experts_LE, self.weight_LE + other.weight_LE,
                      self.groups_LG + other.groups_LG, self.stats_L4 + other.stats_L4)

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.experts_LE - other.experts_LE, self.weight_LE - other.weight_LE,
                      self.groups_LG - other.groups_LG, self.stats_L4 - other.stats_L4)


def load_share(counts_LE: torch.Tensor) -> torch.Tensor:
    """Fraction of each layer's expert assignments that went to each expert (rows of zeros stay zero)."""
    c = counts_LE.double()
    return c / c.sum(-1, keepdim=True).clamp(min=1)


def max_vio(counts_LE: torch.Tensor) -> torch.Tensor:
    c = counts_LE.double()
    mean = c.mean(-1)
    return torch.where(mean > 0, c.max(-1).values / mean.clamp(min=1e-12) - 1, torch.zeros_like(mean))


def coefficient_of_variation(counts_LE: torch.Tensor) -> torch.Tensor:
    c = counts_LE.double()
    mean = c.mean(-1)
    return torch.where(mean > 0, c.std(-1, unbiased=False) / mean.clamp(min=1e-12), torch.zeros_like(mean))


def normalized_entropy(counts_LE: torch.Tensor) -> torch.Tensor:
    """Entropy of the load share over ln(E): 1 = perfectly even, 0 = one expert takes everything."""
    p = load_share(counts_LE)
    h = -(p * torch.log(p.clamp(min=1e-300))).sum(-1)
    return h / math.log(counts_LE.shape[-1]) if counts_LE.shape[-1] > 1 else torch.ones_like(h)


def dead_experts(counts_LE: torch.Tensor) -> torch.Tensor:
    return (counts_LE == 0).sum(-1)


def js_divergence(p_LE: torch.Tensor, q_LE: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence per row, in nats (0 … ln 2)."""
    p, q = p_LE.double(), q_LE.double()
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp(min=1e-300)) - torch.log(b.clamp(min=1e-300))), 0).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


@dataclass(slots=True)
class LayerMeasures:
    layer: int
    tokens: int
    max_vio: float
    cv: float
    entropy: float
    dead: int
    group_share: list[float]
    gate_margin: float
    topk_mass: float
    nonfinite: int
    drift: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def measure(counts: Counts, layers: list[int], baseline_LE: torch.Tensor | None = None) -> list[LayerMeasures]:
    tokens = counts.stats_L4[:, STAT_TOKENS].clamp(min=1)
    mv, cv = max_vio(counts.experts_LE), coefficient_of_variation(counts.experts_LE)
    ent, dead = normalized_entropy(counts.experts_LE), dead_experts(counts.experts_LE)
    groups = load_share(counts.groups_LG)
    margin = counts.stats_L4[:, STAT_MARGIN] / tokens
    mass = counts.stats_L4[:, STAT_MASS] / tokens
    drift = js_divergence(load_share(counts.experts_LE), baseline_LE) if baseline_LE is not None else None
    return [
        LayerMeasures(
            layer=layer, tokens=int(counts.stats_L4[i, STAT_TOKENS]), max_vio=float(mv[i]), cv=float(cv[i]),
            entropy=float(ent[i]), dead=int(dead[i]), group_share=[round(float(g), 4) for g in groups[i]],
            gate_margin=float(margin[i]), topk_mass=float(mass[i]),
            nonfinite=int(counts.stats_L4[i, STAT_NONFINITE]),
            drift=None if drift is None else float(drift[i]),
        )
        for i, layer in enumerate(layers)
    ]
