"""Prometheus metrics of the server, in a registry of their own (no module-level globals)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from routed.engine.async_engine import AsyncEngine
from routed.engine.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine: AsyncEngine, price_per_hour: float = 0.10, cost_window_s: float = 300.0) -> None:
        self.price_per_hour, self.cost_window_s = price_per_hour, cost_window_s
        self._finished: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("routed_requests", "Finished HTTP generation requests by status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("routed_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("routed_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("routed_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("routed_time_per_output_token_seconds", "Mean gap between output tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)

        def stat(name: str) -> float:
            stats = engine.stats()
            return float(getattr(stats, name)) if stats else 0.0

        for name, doc, field in (
            ("routed_queue_depth", "Requests waiting for a seat", "waiting"),
            ("routed_running_requests", "Requests in the running batch", "running"),
            ("routed_cache_usage", "Fraction of latent-cache blocks in use", "cache_usage"),
            ("routed_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens",
             "prefix_cache_hit_rate"),
            ("routed_preemptions", "Requests preempted (recomputed later) since start", "preemptions"),
            ("routed_spec_drafted", "MTP drafts verified since start (--speculative mtp)", "spec_drafted"),
            ("routed_spec_acceptance_rate", "Fraction of MTP drafts accepted since start", "spec_acceptance_rate"),
        ):
            Gauge(name, doc, registry=r).set_function(lambda field=field: stat(field))

        Gauge("routed_price_per_hour_usd", "Stated price of this machine per hour (--price-per-hour)",
              registry=r).set(price_per_hour)
        Gauge("routed_cost_usd_per_mtok_output", "Price per million generated tokens at the measured "
              "generation throughput of the last cost window (0 while idle)",
              registry=r).set_function(lambda: self.cost_per_mtok()[1])
        Gauge("routed_cost_usd_per_mtok_input", "Price per million prompt tokens at the measured prompt "
              "throughput of the last cost window (0 while idle)",
              registry=r).set_function(lambda: self.cost_per_mtok()[0])
        r.register(RoutingCollector(engine))

    def observe(self, out: RequestOutput, submitted: float, first: float | None, finished: float) -> None:
        """Called by the engine thread when a request finishes."""
        self._finished.append((finished, out.prompt_tokens, out.completion_tokens))
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(out.completion_tokens)
        if first is not None:
            self.ttft.observe(first - submitted)
            if out.completion_tokens > 1:
                self.tpot.observe((finished - first) / (out.completion_tokens - 1))

    def cost_per_mtok(self) -> tuple[float, float]:
        """($ per million input tokens, $ per million output tokens) over the last cost window."""
        now = time.monotonic()
        while self._finished and self._finished[0][0] < now - self.cost_window_s:
            self._finished.popleft()
        records = list(self._finished)
        if not records:
            return 0.0, 0.0
        span = max(now - records[0][0], 1.0) if len(records) > 1 else self.cost_window_s
        per_s = self.price_per_hour / 3600
        prompt, generated = sum(r[1] for r in records) / span, sum(r[2] for r in records) / span
        return (per_s / prompt * 1e6 if prompt else 0.0), (per_s / generated * 1e6 if generated else 0.0)


class RoutingCollector(Collector):
    """Routing health at scrape time, bounded cardinality: one series per MoE layer per measure, never per expert."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.engine.engine is None:
            return
        monitor = self.engine.engine.routing
        measures = monitor.measures("window")
        per_layer = {
            "max_vio": ("routed_routing_max_vio", "MaxVio (max load / mean load - 1) over the sliding window"),
            "entropy": ("routed_routing_entropy", "Load entropy / ln(experts) over the sliding window (1 = even)"),
            "dead": ("routed_routing_dead_experts", "Experts with no token in the sliding window"),
            "drift": ("routed_routing_drift", "Jensen-Shannon divergence from the baseline profile (nats)"),
        }
        for field, (name, doc) in per_layer.items():
            family = GaugeMetricFamily(name, doc, labels=["layer"])
            for m in measures:
                value = getattr(m, field)
                if value is not None:
                    family.add_metric([str(m.layer)], float(value))
            yield family
        if measures:
            yield GaugeMetricFamily("routed_routing_max_vio_worst", "Worst layer MaxVio",
                                    value=max(m.max_vio for m in measures))
        alerts = GaugeMetricFamily("routed_routing_alerts", "Active routing alerts by kind", labels=["kind"])
        counts: dict[str, int] = {k: 0 for k in ("dead_experts", "collapse", "drift", "bias_missing",
                                                   "nonfinite_scores")}
        for a in monitor.alerts():
            counts[a.kind] = counts.get(a.kind, 0) + 1
        for kind, n in counts.items():
            alerts.add_metric([kind], n)
        yield alerts
        if (ranks := self.engine.engine.ranks()) is not None:
            pairs = GaugeMetricFamily("routed_ep_rank_expert_pairs",
                                      "(token, expert) pairs each expert-parallel rank computed since the last reset",
                                      labels=["rank"])
            alive = GaugeMetricFamily("routed_ep_rank_alive", "1 while the expert-parallel rank runs",
                                      labels=["rank"])
            for r in ranks:
                pairs.add_metric([str(r["rank"])], r["expert_pairs"])
                alive.add_metric([str(r["rank"])], 1.0 if r["alive"] else 0.0)
            yield pairs
            yield alive
