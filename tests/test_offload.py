"""Expert offload: the offloaded model gives the resident model's logits, through a bounded LRU cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import routed
from routed.model.experts import RoutedExperts


def test_offloaded_logits_equal_resident(tiny_preset: Path) -> None:
    ids = torch.randint(1000, 100000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        resident = routed.load_model(tiny_preset, torch.float32, progress=False)
        expected = resident(ids)
        total = sum(t.numel() * t.element_size() for t in resident.state_dict().values())
        experts = sum(p.numel() * 4 for m in resident.modules() if isinstance(m, RoutedExperts)
                      for p in m.parameters())
        model = routed.load_model(tiny_preset, torch.float32, progress=False,
                                  max_ram_gb=(total - experts * 0.75) / 1e9)  # a quarter of the experts fit
        got = model(ids)
    store = model.expert_store
    assert torch.equal(got, expected)
    assert store.used <= store.capacity == experts // 4
    assert store.stats.misses > 0 and store.stats.bytes_read == store.stats.misses * experts // 32
    assert not any(p.numel() for m in model.modules() if isinstance(m, RoutedExperts) for p in m.buffers()
                   if p.dtype == torch.float32 and p.dim() == 3)


def test_max_ram_errors(tiny_preset: Path) -> None:
    with pytest.raises(routed.RoutedError, match="cannot hold even the non-expert weights"):
        routed.load_model(tiny_preset, progress=False, max_ram_gb=0.01)
    with pytest.raises(routed.RoutedError, match="float checkpoints"):
        routed.load_model(tiny_preset, progress=False, max_ram_gb=0.07, quant="int8")
