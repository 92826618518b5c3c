"""Routing telemetry: measures against hand-computed values; each injected fault raises its alert."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import routed
from conftest import make_checkpoint
from routed.telemetry import HealthConfig, Recording, RoutingMonitor
from routed.telemetry.measures import (Counts, coefficient_of_variation, dead_experts, js_divergence, max_vio,
                                       measure, normalized_entropy)

E = 64


def test_measures_match_hand_computed_values() -> None:
    counts = torch.tensor([[4, 4, 4, 4], [10, 2, 0, 0]])
    assert max_vio(counts).tolist() == pytest.approx([0.0, 10 / 3 - 1])
    assert coefficient_of_variation(counts).tolist() == pytest.approx([0.0, math.sqrt(((10 - 3) ** 2 + 1 + 9 + 9) / 4) / 3])
    p = [10 / 12, 2 / 12]
    assert normalized_entropy(counts).tolist() == pytest.approx([1.0, -sum(x * math.log(x) for x in p) / math.log(4)])
    assert dead_experts(counts).tolist() == [0, 2]
    js = js_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert js.tolist() == pytest.approx([math.log(2)])
    c = Counts(counts, counts.double(), torch.tensor([[8, 8], [12, 0]]),
               torch.tensor([[8.0, 4.0, 6.0, 0.0], [6.0, 3.0, 3.0, 2.0]], dtype=torch.float64))
    m = measure(c, [3, 4])
    assert (m[1].layer, m[1].tokens, m[1].gate_margin, m[1].topk_mass, m[1].nonfinite) == (4, 6, 0.5, 0.5, 2)
    assert m[1].group_share == [1.0, 0.0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 64 experts in 4 groups, top-2
    path, _ = make_checkpoint(tmp_path_factory.mktemp("tel") / "ckpt", n_routed_experts=E, n_group=4, topk_group=2,
                              num_hidden_layers=3, first_k_dense_replace=1)
    return path


def load(folder: Path) -> routed.model.Transformer:
    """The checkpoint with a well-balanced router (small logits, a small positive correction bias)."""
    model = routed.load_model(folder, torch.float32, progress=False)
    g = torch.Generator().manual_seed(0)
    for _, gate in model.gates():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.02)
        gate.e_score_correction_bias.copy_(torch.rand(E, generator=g) * 0.01)
    return model


def run(model: routed.model.Transformer, monitor: RoutingMonitor, lo: int = 0, hi: int = 512, n: int = 12,
        seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            model(torch.randint(lo, hi, (1, 64), generator=g))
            monitor.collect()


def kinds(monitor: RoutingMonitor) -> set[str]:
    return {a.kind for a in monitor.alerts()}


def test_counters_add_up_without_host_reads(folder: Path) -> None:
    model = load(folder)
    monitor = RoutingMonitor(model)
    run(model, monitor, n=3)
    assert monitor.cumulative.tokens == 3 * 64
    assert monitor.cumulative.experts_LE.sum(-1).tolist() == [3 * 64 * 2] * 2  # K assignments per token
    # the counted weights equal the gate's own weights summed per expert
    x = torch.randn(10, 64)
    gate = model.gates()[0][1]
    gate.reset_counters()
    ids, w, _ = gate(x)
    expected = torch.zeros(E).index_add_(0, ids.flatten(), w.flatten())
    assert torch.allclose(gate.expert_weight, expected) and gate.expert_counts.sum() == 20


def test_healthy_model_raises_no_alert(folder: Path) -> None:
    model = load(folder)
    monitor = RoutingMonitor(model)
    run(model, monitor, n=6)
    monitor.set_baseline()
    run(model, monitor, n=6, seed=1)  # more of the same distribution
    assert monitor.alerts() == []


def test_zeroed_bias_is_flagged(folder: Path) -> None:
    model = load(folder)
    for _, gate in model.gates():
        gate.e_score_correction_bias.zero_()
    assert kinds(RoutingMonitor(model)) == {"bias_missing"}


def test_scaled_router_row_collapses(folder: Path) -> None:
    model = load(folder)
    layer, gate = model.gates()[1]
    gate.weight[5] *= 60  # a saturated row: chosen by every token its logit is positive for
    monitor = RoutingMonitor(model)
    run(model, monitor)
    collapse = [a for a in monitor.alerts() if a.kind == "collapse"]
    assert [a.layer for a in collapse] == [layer] and "expert 5" in collapse[0].message


def test_masked_expert_is_dead(folder: Path) -> None:
    model = load(folder)
    layer, gate = model.gates()[0]
    gate.weight[3] = -100.0 * gate.weight[3].sign()  # its score can never rank in a token's top-k
    gate.e_score_correction_bias[3] = -10
    monitor = RoutingMonitor(model)
    run(model, monitor)
    dead = [a for a in monitor.alerts() if a.kind == "dead_experts"]
    assert [a.layer for a in dead] == [layer] and monitor.measures()[0].dead == 1


def test_shifted_inputs_drift_from_baseline(folder: Path) -> None:
    model = load(folder)
    monitor = RoutingMonitor(model, window_tokens=256, health=HealthConfig(drift_threshold=0.05))
    run(model, monitor, lo=0, hi=512)
    monitor.set_baseline()
    assert "drift" not in kinds(monitor)
    run(model, monitor, lo=0, hi=8, n=6)  # a narrow slice of the vocabulary
    assert "drift" in kinds(monitor)


def test_nan_router_scores_are_flagged(folder: Path) -> None:
    model = load(folder)
    model.gates()[0][1].weight[0, 0] = float("nan")
    monitor = RoutingMonitor(model)
    run(model, monitor, n=1)
    assert "nonfinite_scores" in kinds(monitor)


def test_recording_round_trips(folder: Path, tmp_path: Path) -> None:
    model = load(folder)
    monitor = RoutingMonitor(model, record_path=tmp_path / "rec.safetensors", record_every_tokens=128)
    run(model, monitor, n=5)
    rec = Recording.load(monitor.save_recording())
    assert rec.counts_TLE.shape == (3, 2, E) and rec.tokens_T.tolist() == [128, 128, 64]  # 5 x 64 tokens
    assert torch.equal(rec.counts_TLE.sum(0), monitor.cumulative.experts_LE) and rec.layers == [1, 2]
