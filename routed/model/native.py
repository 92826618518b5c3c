"""The native one-token step: a whole token of one sequence — embedding, every decoder block, the final norm and
the lm_head — as one call of routed's C++ `DecodeModel`, each block a `DecodeLayer` (quant/csrc/layer.cpp).

Decode at batch 1 reads every weight once per token, and on a CPU the rest of the step — norms, RoPE, the cache
write, attention over the context, the router, SwiGLU, residuals: thousands of numbers, not millions — cost ~7-9
ms of it on `small` as a compiled PyTorch graph (its ~190 kernels, dispatcher calls and allocations per step,
each slowed by the caches the weight stream just evicted: BENCHMARKS.md). `DecodeLayer` does a whole block
in one call: the weight products through routed's kernels (`bf16_dot`, `int8_dot`, `int4_dot`, the one-call
experts) called directly, everything else in plain C++, with the eager model's roundings to bf16 between steps.
`DecodeModel` runs the blocks in a C++ loop between the embedding row and the logits: a Python loop over the
blocks, the norm and the lm_head's module call cost ~2.5 ms more per token (each Python step right after a
layer's weights went through the caches: decode 1.06x, BENCHMARKS.md).

`build(model)` makes it when every block can run so — bf16 activations, routed's kernels built (AVX2),
every product one they take, resident experts (no offload, no expert parallelism) — and returns None otherwise,
leaving the compiled step (`Transformer.compile_decode`). The engine's one-token steps take it through
`Transformer.decode_logits` (or `forward_hidden` where the step needs the hidden state: speculative decoding);
routing telemetry is counted into each router's buffers as `Gate._count` does.
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


class NativeStep:
    """routed's C++ `DecodeModel` for one model, with the MoE blocks' routers (whose telemetry buffers the engine
    rebinds) found once: a step's arguments without a walk over the modules."""

    def __init__(self, model: object, gates: list) -> None:
        self.model, self.gates = model, gates
        self.has_head, self.layers = model.has_head, model.layers

    def _args(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor | None, batch) -> tuple:
        """`DecodeModel`'s arguments for the one token of one sequence in `batch`."""
        counters = [[g.expert_counts, g.expert_weight, g.route_stats] if g is not None and g.counting else []
                    for g in self.gates]
        position = 0 if positions_BT is None else int(positions_BT.reshape(-1)[0])
        return (int(ids_BT.reshape(-1)[0]), position, batch.cache_LPC, int(batch.slots_N[0]), batch.key_slots[0],
                counters if any(counters) else [])

    def hidden(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor | None, batch) -> torch.Tensor:
        """The hidden state after the final norm, [1, 1, D], for one token of one sequence
        (`Transformer.forward_hidden`)."""
        return self.model.hidden(*self._args(ids_BT, positions_BT, batch))

    def logits(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor | None, batch) -> torch.Tensor:
        """Its logits, [1, V] fp32, in the same one call (`Transformer.decode_logits`)."""
        return self.model.logits(*self._args(ids_BT, positions_BT, batch))


def build(model: nn.Module) -> NativeStep | None:
    """The native one-token step of `model` (a loaded `Transformer`): a `DecodeModel` holding one `DecodeLayer` per
    decoder block, the embedding, the final norm and (where routed's kernels take it) the lm_head — or None if any
    block cannot run natively (see the module docstring)."""
    if model.dtype != torch.bfloat16 or not kernels.int_dot():
        return None
    embed = model.model.embed_tokens.weight
    if embed.dtype != torch.bfloat16 or embed.device.type != "cpu":
        return None
    layers = []
    for block in model.model.layers:
        if block.self_attn.kv_b_proj.weight.device.type != "cpu" or (layer := _layer(block)) is None:
            return None
        layers.append(layer)
    head = _linear_spec(model.lm_head) or (-1, torch.empty(0), torch.empty(0), 0)
    cpp = kernels.module.DecodeModel(layers, embed, model.model.norm.weight, model.model.norm.eps, head,
                                     model.rotary.inv_freq, model.rotary.factor)
    return NativeStep(cpp, [getattr(block.mlp, "gate", None) for block in model.model.layers])
