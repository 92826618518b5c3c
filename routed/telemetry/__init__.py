"""Routing telemetry: device-side counters read once per step, windows, balance measures, health alerts."""

from routed.telemetry.health import Alert, HealthConfig
from routed.telemetry.monitor import Recording, RoutingMonitor

__all__ = ["Alert", "HealthConfig", "Recording", "RoutingMonitor"]
