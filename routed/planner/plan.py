"""A deployment plan: memory per device, decode and prefill throughput, and $ per million tokens.

`make_plan(PlanRequest(...))` -> Plan, a plain dataclass; `Plan.to_dict()` is what `routed plan --json` prints.
Definitions used throughout:

* `batch` = decoding sequences per attention replica (a TP group; per device when tp = 1). Default: the
  largest batch whose latent cache fits at `context`, at most 128 (DeepSeek's production decode batch).
* decode is measured at `context` cached tokens per sequence; prefill at prompts of `context` tokens,
  max(1, 16384 // context) of them per step (DeepSeek's profiled prefill: 16K tokens per GPU per step).
* memory usable = memory × 0.90; the other 10% is left for activations, communication buffers and the
  runtime (vLLM's default gpu_memory_utilization is also 0.90).
* cost: output $/Mtok from decode throughput, input $/Mtok from prefill throughput, each as if its devices
  did only that (prefill and decode on separate devices, as DeepSeek deploys them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.planner.hardware import Hardware
from routed.planner.memory import (
    KV_CACHE_BYTES,
    MemoryFit,
    Parallelism,
    WeightBreakdown,
    kv_bytes_per_token,
    memory_fit,
    weight_breakdown,
)
from routed.planner.roofline import (
    COMPILED_FORMATS,
    Efficiency,
    StepTime,
    cost_per_million,
    engine_compiles,
    step_time,
    step_work,
)

MEMORY_UTILIZATION = 0.90
DEFAULT_MAX_BATCH = 128
PREFILL_TOKENS_PER_STEP = 16384

STAYS_BF16 = ("embedding and lm_head, every RMSNorm, the router weight (bf16) and its correction bias (fp32), "
              "the MTP eh_proj")
SCALES = {"bf16": "none", "fp8": "fp32 scale per 128x128 block", "int8": "fp32 scale per output channel",
          "int4": "bf16 scale per group of 32 inputs (symmetric)"}


@dataclass(slots=True, frozen=True)
class PlanRequest:
    model_name: str
    config: ModelConfig
    hardware: Hardware
    parallelism: Parallelism = Parallelism()
    weights: str | None = None  # default: fp8 for FP8 checkpoints, else bf16
    context: int = 4096
    batch: int | None = None
    price_per_hour: float | None = None  # overrides the hardware's
    efficiency: Efficiency = Efficiency()
    prefill_cached: int = 0  # prompt tokens already cached (prefix hits) per prefill sequence


@dataclass(slots=True)
class Plan:
    request: PlanRequest
    weights: WeightBreakdown
    fit: MemoryFit
    batch: int
    decode: StepTime
    prefill: StepTime
    prefill_prompts: int
    price_per_hour: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def fmt(self) -> str:
        return self.weights.fmt

    @property
    def nodes(self) -> float:
        hw, par = self.request.hardware, self.request.parallelism
        return par.gpus / max(hw.devices_per_node, 1)

    def per_node(self, step: StepTime) -> float:
        return step.tokens_per_second * min(self.request.hardware.devices_per_node, self.request.parallelism.gpus)

    @property
    def output_cost(self) -> float | None:
        return cost_per_million(self.decode.tokens_per_second, self.price_per_hour)

    @property
    def input_cost(self) -> float | None:
        return cost_per_million(self.prefill.tokens_per_second, self.price_per_hour)

    def to_dict(self) -> dict[str, Any]:
        req, par, hw, cfg = self.request, self.request.parallelism, self.request.hardware, self.request.config
        total = self.weights.total_params
        return {
            "model": {"name": req.model_name, "params": total, "layers": cfg.num_hidden_layers,
                      "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok},
            "hardware": hw.to_dict(),
            "parallelism": {"gpus": par.gpus, "tp": par.tp, "ep": par.ep, "dp": par.dp, "nodes": self.nodes},
            "weights": {"format": self.fmt, "scales": SCALES[self.fmt],
                        "stays_bf16": STAYS_BF16 if self.fmt != "bf16" else "everything is bf16",
                        "bytes_by_part": self.weights.bytes, "params_by_part": self.weights.params,
                        "device_bytes_by_part": self.weights.device_bytes, "total_bytes": self.weights.total_bytes,
                        "device_bytes": self.weights.device_total},
            "memory": {"device_memory_bytes": hw.memory_gb * 1e9, "utilization": self.fit.utilization,
                       "usable_bytes": self.fit.device_bytes, "weight_bytes": self.fit.weight_bytes,
                       "kv_bytes_per_token": self.fit.kv_bytes_per_token, "kv_cache_dtype_bytes": KV_CACHE_BYTES,
                       "kv_tokens_fit": self.fit.kv_tokens, "context": req.context,
                       "max_batch_at_context": self.fit.max_batch(req.context),
                       "kv_bytes_at_batch": self.batch * req.context * self.fit.kv_bytes_per_token},
            "decode": _step_dict(self.decode, self) | {"batch": self.batch, "context": req.context,
                                                       "tokens_per_second_per_sequence": 1 / self.decode.step_s},
            "prefill": _step_dict(self.prefill, self) | {"prompts_per_step": self.prefill_prompts,
                                                         "prompt_len": req.context, "cached": req.prefill_cached},
            "cost": {"price_per_device_hour": self.price_per_hour,
                     "price_source": hw.price_source if req.price_per_hour is None else "--price-per-hour",
                     "usd_per_million_output_tokens": self.output_cost,
                     "usd_per_million_input_tokens": self.input_cost},
            "efficiency": req.efficiency.to_dict(),
            "step_model": "memory and compute combine as " + ("max (roofline)" if hw.overlap_memory_compute
                                                              else "a sum (no overlap)")
                          + ("; routed's eager engine: + ops x t_op, activation bytes, attention scores and logits"
                             if hw.eager else "")
                          + ("; decode at batch 1 is routed's compiled one-token step: bytes at the one-row rate + "
                             "blocks x t_block + ops x t_op + scores and logits" if self.decode.work.compiled else ""),
            "notes": self.notes,
        }


def _step_dict(t: StepTime, plan: Plan) -> dict[str, Any]:
    w = t.work
    return {
        "step_seconds": t.step_s, "memory_seconds": t.memory_s, "compute_seconds": t.compute_s,
        "interconnect_seconds": t.comm_s, "overhead_seconds": t.overhead_s, "eager_seconds": t.eager_s,
        "bound": t.bound,
        "tokens_per_step_per_device": w.tokens, "tokens_per_second_per_device": t.tokens_per_second,
        "tokens_per_second_per_node": plan.per_node(t),
        "tokens_per_second_total": t.tokens_per_second * plan.request.parallelism.gpus,
        "weight_bytes": w.weight_bytes, "cache_bytes": w.cache_bytes, "linear_flops": w.linear_flops,
        "attention_flops": w.attention_flops, "nvlink_bytes": w.nvlink_bytes, "network_bytes": w.network_bytes,
        "experts_touched_per_moe_layer": w.experts_touched, "engine_ops": w.ops,
        "activation_bytes": w.activation_bytes, "score_elements": w.score_elements, "logit_elements": w.logit_elements,
        "row_bytes": w.row_bytes, "compiled_blocks": w.blocks, "compiled": w.compiled,
    }


def engine_features(cfg: ModelConfig, hw: Hardware, fmt: str, par: Parallelism) -> dict[str, bool]:
    """step_work's gemv / compile_decode for routed's own engine on `hw`: the loader's rule (engine_compiles),
    on hardware whose probe could compile (Hardware.compiles), one device (a sharded model stays eager), for
    the formats whose compiled step is modelled (COMPILED_FORMATS; others are planned eager)."""
    on = (hw.eager and hw.compiles and par == Parallelism() and fmt in COMPILED_FORMATS
          and engine_compiles(cfg, fmt))
    return {"gemv": on, "compile_decode": on}


def make_plan(req: PlanRequest) -> Plan:
    cfg, hw, par = req.config, req.hardware, req.parallelism
    par.check(cfg)
    if req.context < 1:
        raise RoutedError(f"--context must be at least 1, got {req.context}")
    fmt = req.weights or ("fp8" if cfg.fp8 is not None else "bf16")
    if par.gpus > hw.devices_per_node and not hw.network_gb_s and (par.ep > 1 or par.tp > 1):
        raise RoutedError(f"{hw.name} has no network between nodes; use at most {hw.devices_per_node} device(s)")
    weights = weight_breakdown(cfg, fmt, par)
    fit = memory_fit(weights.device_total, hw.memory_gb * 1e9, kv_bytes_per_token(cfg), MEMORY_UTILIZATION)
    max_batch = fit.max_batch(req.context)
    if max_batch < 1:
        raise RoutedError(
            f"one sequence of {req.context} tokens needs {req.context * fit.kv_bytes_per_token / 1e9:.2f} GB of "
            f"latent cache but only {(fit.device_bytes - fit.weight_bytes) / 1e9:.2f} GB is left beside the "
            "weights: shorten --context or spread the weights over more devices")
    batch = req.batch if req.batch is not None else min(max_batch, DEFAULT_MAX_BATCH)
    if batch < 1:
        raise RoutedError(f"--batch must be at least 1, got {batch}")
    if batch > max_batch:
        raise RoutedError(
            f"--batch {batch} at --context {req.context} needs {batch * req.context * fit.kv_bytes_per_token / 1e9:.1f}"
            f" GB of latent cache per device; {max_batch} sequences fit beside the weights")
    engine = engine_features(cfg, hw, fmt, par)
    decode = step_time(step_work(cfg, fmt, par, "decode", batch, req.context,
                                 devices_per_node=hw.devices_per_node, eager=hw.eager, **engine), hw, req.efficiency)
    prompts = max(1, PREFILL_TOKENS_PER_STEP // req.context)
    new = max(req.context - req.prefill_cached, 1)
    prefill = step_time(step_work(cfg, fmt, par, "prefill", prompts, 0, new_tokens=new, cached=req.prefill_cached,
                                  devices_per_node=hw.devices_per_node, eager=hw.eager, **engine), hw, req.efficiency)
    price = req.price_per_hour if req.price_per_hour is not None else hw.price_per_hour
    notes = _notes(cfg, hw, fmt, par)
    return Plan(req, weights, fit, batch, decode, prefill, prompts, price, notes)


def _notes(cfg: ModelConfig, hw: Hardware, fmt: str, par: Parallelism) -> list[str]:
    notes = ["latent cache in bf16; MTP module not loaded (routed serves without it)"]
    if fmt == "fp8" and not hw.fp8_tflops:
        notes.append(f"{hw.name} has no fp8 units: routed re-quantizes fp8 weights to int8 at load (the same bytes) "
                     "and multiplies at the bf16 rate")
    if fmt in ("int8", "int4"):
        notes.append(f"{fmt} is weight-only: matmuls run at the bf16 rate")
    if cfg.n_routed_experts and cfg.n_routed_experts % par.ep:
        notes.append(f"{cfg.n_routed_experts} experts over EP{par.ep}: {-(-cfg.n_routed_experts // par.ep)} "
                     "slots per device, the spare slots hold redundant copies")
    if not hw.overlap_memory_compute:
        notes.append("CPU step model: memory time + compute time (no overlap); calibrate with --calibrate")
    if hw.eager:
        if engine_features(cfg, hw, fmt, par)["compile_decode"]:
            notes.append("routed compiles this model's one-token decode (bf16, >= 256 MiB of weights): decode at "
                         "batch 1 is modelled as the compiled step; larger batches and prefill as the eager engine")
        elif par == Parallelism() and engine_compiles(cfg, fmt) and fmt not in COMPILED_FORMATS:
            notes.append(f"routed compiles this model's one-token decode in {fmt} too, which the planner does not "
                         "model yet (no probed rate for its fused loops): decode at batch 1 is planned eager, "
                         "slower than routed runs it")
        else:
            why = ("the probe could not compile here" if not hw.compiles else
                   "not on one device" if par != Parallelism() else
                   "routed compiles only models of >= 256 MiB of weights")
            notes.append(f"routed's engine stays eager for this plan ({why})")
    return notes


def batch_sweep(req: PlanRequest, plan: Plan) -> list[tuple[int, StepTime]]:
    """Decode steps at batch 1, 2, 4, ... up to the largest that fits, for the picture."""
    cfg, hw, par = req.config, req.hardware, req.parallelism
    top = max(plan.fit.max_batch(req.context), 1)
    batches, b = [], 1
    while b < top:
        batches.append(b)
        b *= 2
    batches.append(top)
    engine = engine_features(cfg, hw, plan.fmt, par)
    return [(b, step_time(step_work(cfg, plan.fmt, par, "decode", b, req.context, devices_per_node=hw.devices_per_node,
                                    eager=hw.eager, **engine), hw, req.efficiency)) for b in batches]
