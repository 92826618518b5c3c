"""Routing health checks: the ways routing fails quietly, turned into alerts.

* `dead_experts`   experts that received no token in the window, once the window is large enough that every
                   expert should have had `dead_min_expected` tokens on average;
* `collapse`       one expert is chosen by more than min(collapse_factor · K/E, 0.8) of the tokens (K/E is
                   the even share; capped at 80% because a layer with K close to E is busy everywhere);
* `drift`          the layer's load distribution moved away from a recorded baseline (Jensen–Shannon
                   divergence above `drift_threshold` nats);
* `bias_missing`   a noaux_tc model whose e_score_correction_bias is all zeros (or was absent from the
                   checkpoint): selection then ignores the trained balance;
* `nonfinite_scores`  NaN or inf router logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from routed.model.deepseek_v3 import Transformer
from routed.telemetry.measures import Counts, LayerMeasures, load_share


@dataclass(slots=True, frozen=True)
class HealthConfig:
    collapse_factor: float = 8.0
    drift_threshold: float = 0.05
    dead_min_expected: float = 20.0  # average tokens per expert before "dead" means anything


@dataclass(slots=True, frozen=True)
class Alert:
    kind: str
    layer: int | None
    message: str
    value: float

    def as_dict(self) -> dict:
        return asdict(self)


def static_checks(model: Transformer) -> list[Alert]:
    """Checks on the weights themselves, run once at start."""
    alerts = []
    for layer, gate in model.gates():
        if gate.topk_method == "noaux_tc":
            bias = gate.e_score_correction_bias
            if bias is None or not bool(bias.abs().sum() > 0):
                alerts.append(Alert("bias_missing", layer, f"layer {layer}: noaux_tc router but "
                                    "e_score_correction_bias is all zeros or missing", 0.0))
    return alerts


def check(counts: Counts, measures: list[LayerMeasures], top_k: int, config: HealthConfig) -> list[Alert]:
    alerts = []
    E = counts.experts_LE.shape[1]
    collapse_at = min(config.collapse_factor * top_k / E, 0.8)
    for i, m in enumerate(measures):
        expected_per_expert = m.tokens * top_k / E
        if m.dead and expected_per_expert >= config.dead_min_expected:
            alerts.append(Alert("dead_experts", m.layer, f"layer {m.layer}: {m.dead} of {E} experts got no token "
                                f"in {m.tokens} tokens", float(m.dead)))
        top = float(counts.experts_LE[i].max()) / max(m.tokens, 1)  # fraction of tokens choosing it
        if m.tokens and top > collapse_at:
            e = int(counts.experts_LE[i].argmax())
            alerts.append(Alert("collapse", m.layer, f"layer {m.layer}: expert {e} is chosen by {top:.1%} of the "
                                f"tokens (threshold {collapse_at:.1%})", top))
        if m.drift is not None and m.tokens and m.drift > config.drift_threshold:
            alerts.append(Alert("drift", m.layer, f"layer {m.layer}: load distribution drifted from the baseline "
                                f"(JS {m.drift:.3f} > {config.drift_threshold})", m.drift))
        if m.nonfinite:
            alerts.append(Alert("nonfinite_scores", m.layer, f"layer {m.layer}: {m.nonfinite} NaN/inf router "
                                "logits", float(m.nonfinite)))
    return alerts


def baseline_from(counts: Counts) -> torch.Tensor:
    return load_share(counts.experts_LE)
