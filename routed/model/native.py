"""The native one-token step: each decoder block as one call of routed's C++ `DecodeLayer` (quant/csrc/layer.cpp).

Decode at batch 1 reads every weight once per token, and on a CPU the rest of the step — norms, RoPE, the cache
write, attention over the context, the router, SwiGLU, residuals: thousands of numbers, not millions — cost ~7-9
ms of it on `small` as a compiled PyTorch graph (its ~190 kernels, dispatcher calls and allocations per step,
each slowed by the caches the weight stream just evicted: BENCHMARKS.md). `DecodeLayer.forward` does a whole block
in one call: the weight products through routed's kernels (`bf16_dot`, `int8_dot`, `int4_dot`, the one-call
experts) called directly, everything else in plain C++, with the eager model's roundings to bf16 between steps.

`build(model)` makes the layers when every block can run so — bf16 activations, routed's kernels built (AVX2),
every product one they take, resident experts (no offload, no expert parallelism) — and returns None otherwise,
leaving the compiled step (`Transformer.compile_decode`). The engine's one-token steps take it through
`Transformer.forward_hidden`; routing telemetry is counted into each router's buffers as `Gate._count` does.
"""

from __future__ import annotations

import torch
from torch import nn

from routed.quant import kernels
from routed.quant.linear import QLinear

GATE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def _linear_spec(module: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, int] | None:
    """(kind, tensor, tensor, group) for `DecodeLayer`: 0 bf16, 1 int8, 2 int4 — or None where routed's kernels
    do not take this linear."""
    empty = torch.empty(0)
    if isinstance(module, QLinear):
        if module.fmt.bits == 8:
            ok = module._rows is None and kernels.INT8_DOT and module.in_features % 32 == 0
            return (1, module.qweight, module.scales, 0) if ok else None
        ok = (kernels.INT4_DOT and module._packed is not None and module.fmt.group_size % 32 == 0
              and module.out_features % 32 == 0)
        return (2, module._packed, module.scales_zeros, module.fmt.group_size) if ok else None
    if isinstance(module, nn.Linear) and module.bias is None:
        w = module.weight
        ok = kernels.BF16_DOT and w.dtype == torch.bfloat16 and w.is_contiguous()
        return (0, w, empty, 0) if ok else None
    return None


def _mlp_specs(mlp: nn.Module, prefix: str) -> dict | None:
    specs = {}
    for name in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"):
        if (child := getattr(mlp, name, None)) is not None:
            if (spec := _linear_spec(child)) is None:
                return None
            specs[f"{prefix}.{name}"] = spec
    return specs


def _layer(block: nn.Module) -> object | None:
    from routed.model.deepseek_v3 import MoE

    attn = block.self_attn
    linears: dict = {}
    for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        if (child := getattr(attn, name, None)) is not None:
            if (spec := _linear_spec(child)) is None:
                return None
            linears[name] = spec
    kv_b = attn.kv_b_proj.weight
    if kv_b.dtype != torch.bfloat16:
        return None
    tensors = {"input_layernorm": block.input_layernorm.weight, "post_attention_layernorm":
               block.post_attention_layernorm.weight, "kv_a_layernorm": attn.kv_a_layernorm.weight,
               "kv_b_proj": kv_b}
    if hasattr(attn, "q_a_layernorm"):
        tensors["q_a_layernorm"] = attn.q_a_layernorm.weight
    numbers = {"num_heads": attn.num_heads, "nope_dim": attn.nope_dim, "rope_dim": attn.rope_dim,
               "v_dim": attn.v_dim, "kv_lora_rank": attn.kv_lora_rank, "eps": block.input_layernorm.eps,
               "scale": attn.scale}
    experts_kind, experts, group = -1, [], 0
    mlp = block.mlp
    if isinstance(mlp, MoE):
        gate, routed = mlp.gate, mlp.experts
        if mlp.ep is not None or not routed.fused or gate.topk_method not in GATE_METHODS:
            return None
        tensors["gate.weight"] = gate.weight
        if gate.e_score_correction_bias is not None:
            tensors["gate.bias"] = gate.e_score_correction_bias
        numbers |= {"top_k": gate.top_k, "n_group": gate.n_group, "topk_group": gate.topk_group,
                    "sigmoid": float(gate.scoring_func == "sigmoid"), "topk_method": GATE_METHODS[gate.topk_method],
                    "norm_topk_prob": float(gate.norm_topk_prob), "routed_scaling_factor": gate.scaling,
                    "candidates": gate.candidates}
        if routed.fmt is None:
            experts_kind, experts = 0, list(routed._gathered_weights())
        elif routed.fmt.bits == 8:
            experts_kind, experts = 1, list(routed._gathered_weights())
        else:
            p = routed._packed
            experts_kind, group = 2, routed.fmt.group_size
            experts = [p["gate_up_proj"], p["gate_up_proj_scales_zeros"], p["down_proj"], routed.down_proj_scales_zeros]
        if mlp.shared_experts is not None:
            if (shared := _mlp_specs(mlp.shared_experts, "shared")) is None:
                return None
            linears |= shared
    else:
        if (dense := _mlp_specs(mlp, "mlp")) is None:
            return None
        linears |= dense
    return kernels.module.DecodeLayer(linears, tensors, {k: float(v) for k, v in numbers.items()}, experts_kind,
                                      experts, group)


def build(model: nn.Module) -> list | None:
    """One `DecodeLayer` per decoder block of `model` (a loaded `Transformer`), or None if any block cannot run
    natively (see the module docstring)."""
    if model.dtype != torch.bfloat16 or not kernels.int_dot():
        return None
    layers = []
    for block in model.model.layers:
        if block.self_attn.kv_b_proj.weight.device.type != "cpu" or (layer := _layer(block)) is None:
            return None
        layers.append(layer)
    return layers


def run(model: nn.Module, h_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor:
    """The decoder blocks for one token of one sequence (`Transformer.forward_hidden`)."""
    cos, sin = (t.reshape(-1) for t in rope)
    slot, key_slots = int(batch.slots_N[0]), batch.key_slots[0]
    for i, (layer, block) in enumerate(zip(model._native, model.model.layers)):
        gate = getattr(block.mlp, "gate", None)  # a MoE block's router (its telemetry buffers, rebound per engine)
        counters = ([gate.expert_counts, gate.expert_weight, gate.route_stats]
                    if gate is not None and gate.counting else [])
        h_BTD = layer.forward(h_BTD, cos, sin, batch.cache_LPC, i, slot, key_slots, counters)
    return h_BTD
