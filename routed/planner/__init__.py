"""routed.planner: will a DeepSeek-V3-family model fit, how fast will it run, and what will a token cost.

Everything is computed from the config and stated hardware figures — no weights are loaded:

    models.py      model presets (deepseek-v3, deepseek-v2-lite, moonlight, kimi-k2, small) as config dicts
    hardware.py    hardware presets with sources (h800, h100, h200, a100, b200), `local` (probed), JSON files
    memory.py      exact weight bytes by part and format, per device under TP/EP; latent cache per token
    roofline.py    one engine step's bytes, FLOPs and all-to-all bytes -> seconds, with stated efficiencies
    plan.py        a whole plan: memory fit, decode and prefill throughput, $ per million tokens
    calibrate.py   fit the efficiency factors to `routed bench --json` measurements
    reference.py   the same model against DeepSeek's published production deployment (docs/cost.md)
    plot.py        throughput and $/Mtok against batch size, with the roofline regimes
    cli.py         `routed plan`
"""

from routed.planner.hardware import HARDWARE_PRESETS, Hardware, get_hardware
from routed.planner.memory import Parallelism, kv_bytes_per_token, weight_breakdown
from routed.planner.models import MODEL_PRESETS, preset_config
from routed.planner.plan import Plan, PlanRequest, make_plan
from routed.planner.roofline import Efficiency

__all__ = [
    "HARDWARE_PRESETS", "MODEL_PRESETS", "Efficiency", "Hardware", "Parallelism", "Plan", "PlanRequest",
    "get_hardware", "kv_bytes_per_token", "make_plan", "preset_config", "weight_breakdown",
]
