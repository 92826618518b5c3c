"""Prometheus metrics of the server, in a registry of their own (no module-level globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from routed.engine.async_engine import AsyncEngine
from routed.engine.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine: AsyncEngine) -> None:
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
        ):
            Gauge(name, doc, registry=r).set_function(lambda field=field: stat(field))

    def observe(self, out: RequestOutput, submitted: float, first: float | None, finished: float) -> None:
        """Called by the engine thread when a request finishes."""
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(out.completion_tokens)
        if first is not None:
            self.ttft.observe(first - submitted)
            if out.completion_tokens > 1:
                self.tpot.observe((finished - first) / (out.completion_tokens - 1))
