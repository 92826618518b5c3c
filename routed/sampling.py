"""Sampling parameters and the sampler, as pure functions over fp32 logits.

`sample(logits_BV, params, generators)` -> next ids [B]: greedy when temperature is 0, otherwise
temperature, then top-k, then top-p (nucleus) filtering, then a draw from each row's own generator (so a
seeded request gives the same tokens whatever else is in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from routed.errors import RoutedError


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RoutedError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise RoutedError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RoutedError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RoutedError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise RoutedError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def filter_logits(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits with everything outside top-k and the top-p nucleus set to −inf."""
    logits_V = logits_V / temperature
    if 0 < top_k < logits_V.shape[-1]:
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits_V.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits_V = logits_V.masked_fill(drop, float("-inf"))
    return logits_V


def sample(
    logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    out = logits_BV.argmax(dim=-1)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        probs = filter_logits(logits_BV[row].float(), p.temperature, p.top_k, p.top_p).softmax(-1)
        out[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    return out
