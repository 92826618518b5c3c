"""Expert offload: routed experts that do not fit in `--max-ram` stay on disk, with an LRU cache in RAM.

The store knows where each expert's three weights live in the checkpoint (file, offset, dtype) and reads
an expert on a miss straight into fresh tensors (FP8 or another dtype: converted on the way), evicting the
least recently used experts until the cache fits its byte budget. Counts hits, misses and bytes read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(slots=True)
class OffloadStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


class ExpertStore:
    def __init__(self, capacity_bytes: int, read: Callable[[str], torch.Tensor]) -> None:
        """`read(name)` returns a checkpoint tensor in the model dtype (the loader's reader)."""
        self.capacity, self.read = capacity_bytes, read
        self.cache: OrderedDict[tuple[int, int], tuple[torch.Tensor, ...]] = OrderedDict()
        self.used = 0
        self.stats = OffloadStats()

    def get(self, layer: int, expert: int, prefix: str) -> tuple[torch.Tensor, ...]:
        key = (layer, expert)
        weights = self.cache.get(key)
        if weights is not None:
            self.cache.move_to_end(key)
            self.stats.hits += 1
            return weights
        self.stats.misses += 1
        weights = tuple(self.read(f"{prefix}.{expert}.{proj}.weight") for proj in PROJS)
        size = sum(w.numel() * w.element_size() for w in weights)
        self.stats.bytes_read += size
        while self.cache and self.used + size > self.capacity:
            _, old = self.cache.popitem(last=False)
            self.used -= sum(w.numel() * w.element_size() for w in old)
        self.cache[key] = weights
        self.used += size
        return weights
