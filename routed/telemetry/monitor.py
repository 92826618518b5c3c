"""RoutingMonitor: reads the routers' device counters once per step and keeps windows, measures and alerts.

Windows: `cumulative` since start or `reset()`, and `window`, the last `window_tokens` tokens (a deque of
per-step deltas with a running sum). Alerts are re-evaluated after every collect; a new alert is logged
once when it appears. With a recording path, the counts since the last record are appended every
`record_every_tokens` tokens and written as safetensors (`counts` [T, L, E], `tokens` [T], `time` [T],
`layers` [L]) — for offline analysis (`routed stats --recording`) and expert placement.

The monitor rebinds the routers' counter buffers to rows of its own stacked buffers, so one copy reads all
layers; the monitor attached last to a model owns its counters. Alerts are re-evaluated every
window_tokens/16 tokens (and on `alerts()`-relevant changes such as `set_baseline`).

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
        self.check_every = max(1, window_tokens // 16)  # alerts are about windows: re-check every ~1/16 of one
        self._bind()
        self.reset()

    # ---- collection (engine thread) ----------------------------------------------------------------
    def _bind(self) -> None:
        """Point every router's counters at rows of three stacked buffers: one read and one reset per step."""
        L, E, _ = self.shape
        device = self.gates[0][1].weight.device if self.gates else "cpu"
        self._counts_LE = torch.zeros(L, E, dtype=torch.long, device=device)
        self._weight_LE = torch.zeros(L, E, dtype=torch.float32, device=device)
        self._stats_L4 = torch.zeros(L, 4, dtype=torch.float32, device=device)
        for i, (_, gate) in enumerate(self.gates):
            gate.expert_counts, gate.expert_weight, gate.route_stats = (
                self._counts_LE[i], self._weight_LE[i], self._stats_L4[i])

    def read_step(self) -> Counts:
        """Read and zero the counters of every router: three copies, no per-layer host sync."""
        L, E, G = self.shape
        counts_LE = self._counts_LE.cpu().clone()
        step = Counts(counts_LE, self._weight_LE.double().cpu(), counts_LE.view(L, G, E // G).sum(-1),
                      self._stats_L4.double().cpu())
        for buf in (self._counts_LE, self._weight_LE, self._stats_L4):
            buf.zero_()
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
            self._unchecked += step.tokens
            if self._unchecked < self.check_every:
                return
            self._unchecked = 0
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
            self._unchecked = 0

    def set_baseline(self, counts: Counts | None = None) -> None:
        """Record the reference load profile drift is measured against (default: the cumulative counts)."""
        with self._lock:
            self.baseline_LE = baseline_from(counts or self.cumulative)
            self._alerts = self._evaluate()

    # ---- reading (any thread) ----------------------------------------------------------------------
    def alerts(self) -> list[Alert]:
        with self._lock:
            if self._unchecked:
                self._alerts, self._unchecked = self._evaluate(), 0
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

