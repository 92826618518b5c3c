"""RoutingMonitor: reads the routers' device counters once per step and keeps windows, measures and alerts.

Windows: `cumulative` since start or `reset()`, and `window`, the last `window_tokens` tokens (a deque of
per-step deltas with a running sum). Alerts are re-evaluated after every collect; a new alert is logged
once when it appears. With a recording path, the counts since the last record are appended every
`record_every_tokens` tokens and written as safetensors (`counts` [T, L, E], `tokens` [T], `time` [T],
`layers` [L]) — for offline analysis (`routed stats --recording`) and expert placement.

Thread-safety: the engine thread calls `collect`; server threads read `snapshot`/`alerts` under the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from routed.errors import RoutedError

from routed.model.deepseek_v3 import Transformer
from routed.telemetry.health import Alert, HealthConfig, baseline_from, check, static_checks
from routed.telemetry.measures import Counts, LayerMeasures, measure

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Recording:
    counts_TLE: torch.Tensor
    tokens_T: torch.Tensor
    time_T: torch.Tensor
    layers: list[int]
    top_k: int

    def save(self, path: str | Path) -> None:
        save_file({"counts": self.counts_TLE.contiguous(), "tokens": self.tokens_T, "time": self.time_T,
                   "layers": torch.tensor(self.layers)}, str(path), metadata={"top_k": str(self.top_k)})

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        try:
            t = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                top_k = int((f.metadata() or {}).get("top_k", "1"))
            return cls(t["counts"], t["tokens"], t["time"], t["layers"].tolist(), top_k)
        except Exception as e:  # missing file, not safetensors (SafetensorError), wrong tensors (KeyError)
            raise RoutedError(f"{path}: not a routing recording ({e})") from None


class RoutingMonitor:
    def __init__(self, model: Transformer, window_tokens: int = 4096, health: HealthConfig | None = None,
                 record_path: str | Path | None = None, record_every_tokens: int = 1024) -> None:
        self.gates = model.gates()
        self.layers = [layer for layer, _ in self.gates]
        cfg = model.config
        self.shape = (len(self.gates), cfg.n_routed_experts, cfg.n_group)
        self.top_k = cfg.num_experts_per_tok
        self.window_tokens, self.health = window_tokens, health or HealthConfig()
        self.static_alerts = static_checks(model)
        for alert in self.static_alerts:
            log.warning("routing alert: %s", alert.message)
        self.record_path = Path(record_path) if record_path else None
        self.record_every = record_every_tokens
        self._lock = threading.Lock()
        self._records: list[tuple[float, Counts]] = []
        self.baseline_LE: torch.Tensor | None = None
        self.reset()

    # ---- collection (engine thread) ----------------------------------------------------------------
    def read_step(self) -> Counts:
        """Read and zero every router's counters: one copy per buffer kind, no per-layer host sync."""
        if not self.gates:
            return Counts.zeros(*self.shape)
        gates = [g for _, g in self.gates]
        step = Counts(torch.stack([g.expert_counts for g in gates]).cpu(),
                      torch.stack([g.expert_weight for g in gates]).double().cpu(),
                      torch.stack([g.group_counts for g in gates]).cpu(),
                      torch.stack([g.route_stats for g in gates]).double().cpu())
        for g in gates:
            g.reset_counters()
        return step

    def collect(self) -> None:
        step = self.read_step()
        if step.tokens == 0:
            return
        with self._lock:
            self.cumulative = self.cumulative + step
            self._steps.append(step)
            self.window = self.window + step
            while len(self._steps) > 1 and self.window.tokens - self._steps[0].tokens >= self.window_tokens:
                self.window = self.window - self._steps.popleft()
            self._since_record = self._since_record + step
            if self.record_path and self._since_record.tokens >= self.record_every:
                self._records.append((time.time(), self._since_record))
                self._since_record = Counts.zeros(*self.shape)
            before = {(a.kind, a.layer) for a in self._alerts}
            self._alerts = self._evaluate()
        for alert in self._alerts:
            if (alert.kind, alert.layer) not in before:
                log.warning("routing alert: %s", alert.message)

    def _evaluate(self) -> list[Alert]:
        return check(self.window, measure(self.window, self.layers, self.baseline_LE), self.top_k, self.health)

    # ---- control -----------------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.cumulative = Counts.zeros(*self.shape)
            self.window = Counts.zeros(*self.shape)
            self._since_record = Counts.zeros(*self.shape)
            self._steps: deque[Counts] = deque()
            self._alerts: list[Alert] = []

    def set_baseline(self, counts: Counts | None = None) -> None:
        """Record the reference load profile drift is measured against (default: the cumulative counts)."""
        with self._lock:
            self.baseline_LE = baseline_from(counts or self.cumulative)
            self._alerts = self._evaluate()

    # ---- reading (any thread) ----------------------------------------------------------------------
    def alerts(self) -> list[Alert]:
        with self._lock:
            return self.static_alerts + list(self._alerts)

    def measures(self, which: str = "window") -> list[LayerMeasures]:
        with self._lock:
            counts = self.window if which == "window" else self.cumulative
            return measure(counts, self.layers, self.baseline_LE)

    def snapshot(self) -> dict:
        """JSON-ready: counts of both windows (layers x experts), measures, alerts."""
        with self._lock:
            windows = {}
            for name, counts in (("cumulative", self.cumulative), ("window", self.window)):
                windows[name] = {"tokens": counts.tokens, "expert_counts": counts.experts_LE.tolist(),
                                 "measures": [m.as_dict() for m in measure(counts, self.layers, self.baseline_LE)]}
            alerts = self.static_alerts + list(self._alerts)
        return {"layers": self.layers, "num_experts": self.shape[1], "top_k": self.top_k,
                "window_tokens": self.window_tokens, "windows": windows, "alerts": [a.as_dict() for a in alerts]}

    def save_recording(self) -> Path | None:
        """Write what has been recorded (plus the partial last record) to the recording path."""
        if not self.record_path:
            return None
        with self._lock:
            records = self._records + ([(time.time(), self._since_record)] if self._since_record.tokens else [])
        if not records:
            return None
        Recording(torch.stack([c.experts_LE for _, c in records]), torch.tensor([c.tokens for _, c in records]),
                  torch.tensor([t for t, _ in records], dtype=torch.float64), self.layers,
                  self.top_k).save(self.record_path)
        log.info("routing recording: %d windows -> %s", len(records), self.record_path)
        return self.record_path

