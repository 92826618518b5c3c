"""The planner against DeepSeek's published production deployment (open-infra-index, day 6, Feb 2025).

Published (24 h to 2025-02-28 12:00 UTC+8): H800 nodes of 8 GPUs, FP8 GEMMs and dispatch, BF16 MLA and
combine; prefill EP32 / DP32 over 4 nodes, decode EP144 / DP144 over 18 nodes; ~73.7k input tokens/s per
node in prefill (cache hits included; 56.3% of input tokens hit the on-disk KV cache) and ~14.8k output
tokens/s per node in decode; average KV length per output token 4,989; 608B input and 168B output tokens;
226.75 nodes on average at $2 per GPU-hour = $87,072 per day.

Inputs the planner needs that DeepSeek did not publish, and the values used (docs/cost.md argues each):
* decode batch: 128 sequences per GPU (the batch of DeepSeek's decode profile and DeepEP's benchmarks);
* prefill prompt: 4,383 tokens on average, of which 56.3% (2,468) are a cached prefix — from
  P + D/2 = 4,989 and P/D = 608/168 (P prompt, D output length); 16K tokens per GPU per step (profile-data);
* efficiency factors: the planner's defaults (`Efficiency()`), set from DeepSeek's kernel READMEs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from routed.planner.hardware import HARDWARE_PRESETS
from routed.planner.memory import Parallelism
from routed.planner.models import preset_config
from routed.planner.roofline import Efficiency, StepTime, step_time, step_work

PUBLISHED = {
    "decode_output_tokens_per_s_per_node": 14_800,
    "prefill_input_tokens_per_s_per_node": 73_700,  # cache hits included
    "cache_hit_rate": 0.563,
    "kv_len_per_output_token": 4_989,
    "input_tokens_per_day": 608e9,
    "output_tokens_per_day": 168e9,
    "nodes": 226.75,
    "usd_per_gpu_hour": 2.0,
    "usd_per_day": 87_072,
    "output_tokens_per_s_per_user": (20, 22),
}
DECODE_BATCH = 128
PROMPT_LEN = round(PUBLISHED["kv_len_per_output_token"]
                   / (1 + 0.5 * PUBLISHED["output_tokens_per_day"] / PUBLISHED["input_tokens_per_day"]))
PREFILL_TOKENS_PER_GPU = 16384


@dataclass(slots=True)
class DeepSeekCheck:
    decode: StepTime
    prefill: StepTime
    efficiency: Efficiency

    @property
    def decode_per_node(self) -> float:
        return self.decode.tokens_per_second * 8

    @property
    def prefill_computed_per_node(self) -> float:
        return self.prefill.tokens_per_second * 8

    @property
    def prefill_per_node_with_hits(self) -> float:
        """Computed tokens scaled up by the cache hits that cost no compute, as DeepSeek counts them."""
        return self.prefill_computed_per_node / (1 - PUBLISHED["cache_hit_rate"])

    def to_dict(self) -> dict[str, Any]:
        node_hour = 8 * PUBLISHED["usd_per_gpu_hour"]
        decode_nodes = PUBLISHED["output_tokens_per_day"] / (self.decode_per_node * 86400)
        prefill_nodes = PUBLISHED["input_tokens_per_day"] / (self.prefill_per_node_with_hits * 86400)
        published_decode_nodes = PUBLISHED["output_tokens_per_day"] / (
            PUBLISHED["decode_output_tokens_per_s_per_node"] * 86400)
        published_prefill_nodes = PUBLISHED["input_tokens_per_day"] / (
            PUBLISHED["prefill_input_tokens_per_s_per_node"] * 86400)
        return {
            "decode": {"batch_per_gpu": DECODE_BATCH, "context": PUBLISHED["kv_len_per_output_token"],
                       "step_ms": self.decode.step_s * 1e3, "memory_ms": self.decode.memory_s * 1e3,
                       "compute_ms": self.decode.compute_s * 1e3, "interconnect_ms": self.decode.comm_s * 1e3,
                       "tokens_per_s_per_user": 1 / self.decode.step_s,
                       "planner_per_node": self.decode_per_node,
                       "published_per_node": PUBLISHED["decode_output_tokens_per_s_per_node"],
                       "ratio": self.decode_per_node / PUBLISHED["decode_output_tokens_per_s_per_node"]},
            "prefill": {"prompt_len": PROMPT_LEN, "cached_prefix": self.prefill_cached,
                        "tokens_per_gpu_per_step": self.prefill.work.tokens, "step_ms": self.prefill.step_s * 1e3,
                        "compute_ms": self.prefill.compute_s * 1e3, "interconnect_ms": self.prefill.comm_s * 1e3,
                        "planner_computed_per_node": self.prefill_computed_per_node,
                        "planner_per_node_with_hits": self.prefill_per_node_with_hits,
                        "published_per_node_with_hits": PUBLISHED["prefill_input_tokens_per_s_per_node"],
                        "ratio": self.prefill_per_node_with_hits / PUBLISHED["prefill_input_tokens_per_s_per_node"]},
            "cost": {
                "usd_per_million_output": node_hour / (self.decode_per_node * 3600) * 1e6,
                "usd_per_million_input_with_hits": node_hour / (self.prefill_per_node_with_hits * 3600) * 1e6,
                "published_usd_per_million_output": node_hour / (
                    PUBLISHED["decode_output_tokens_per_s_per_node"] * 3600) * 1e6,
                "published_usd_per_million_input_with_hits": node_hour / (
                    PUBLISHED["prefill_input_tokens_per_s_per_node"] * 3600) * 1e6,
                "nodes_for_published_volume": decode_nodes + prefill_nodes,
                "usd_per_day_for_published_volume": (decode_nodes + prefill_nodes) * node_hour * 24,
                "published_nodes_implied_by_throughputs": published_decode_nodes + published_prefill_nodes,
                "published_nodes": PUBLISHED["nodes"], "published_usd_per_day": PUBLISHED["usd_per_day"],
            },
            "efficiency": self.efficiency.to_dict(),
        }

    @property
    def prefill_cached(self) -> int:
        return round(PROMPT_LEN * PUBLISHED["cache_hit_rate"])


def deepseek_check(efficiency: Efficiency | None = None) -> DeepSeekCheck:
    """Plan DeepSeek-V3 on H800 in FP8 the way DeepSeek deployed it; per-node figures to set beside theirs."""
    eff = efficiency or Efficiency()
    cfg, hw = preset_config("deepseek-v3"), HARDWARE_PRESETS["h800"]
    ctx = PUBLISHED["kv_len_per_output_token"]
    decode = step_time(step_work(cfg, "fp8", Parallelism(144, 1, 144), "decode", DECODE_BATCH, ctx), hw, eff)
    cached = round(PROMPT_LEN * PUBLISHED["cache_hit_rate"])
    new = PROMPT_LEN - cached
    prompts = max(1, PREFILL_TOKENS_PER_GPU // new)
    prefill = step_time(step_work(cfg, "fp8", Parallelism(32, 1, 32), "prefill", prompts, 0, new_tokens=new,
                                  cached=cached), hw, eff)
    return DeepSeekCheck(decode, prefill, eff)
