"""int4 decode at batch 1 in one process, interleaved: SwiGLU gate and up as one packed weight per expert and
per dense/shared MLP (routed's load, one int4 kernel call for both) against separate gate and up products
(before: two calls). The separate weights are the merged ones' row blocks (the kernel packs rows in blocks of
`_packed_block()`, so the first I rows of a packed [2I, K/2] tensor are gate's packed bytes), copied out.

    python benchmarks/int4_gate_up_ab.py --model checkpoints/small --quant int4 --rounds 8
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from compiled_plans import compare, plan_with, setup  # benchmarks/compiled_plans.py
from routed.model import deepseek_v3
from routed.model.experts import RoutedExperts
from routed.quant.intq import _packed_block
from routed.quant.linear import QLinear


def expert_separate(self: RoutedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    return self._proj("down_proj", e, F.silu(self._proj("gate_proj", e, x)) * self._proj("up_proj", e, x))


def mlp_separate(self: deepseek_v3.MLP, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(F.silu(self._gate_sep(x)) * self._up_sep(x))


def split_qlinear(merged: QLinear, half: int) -> QLinear:
    q = QLinear(merged.in_features, merged.out_features // 2, merged.fmt)
    rows = slice(half * q.out_features, (half + 1) * q.out_features)
    q._packed, q.scales_zeros = merged._packed[rows].clone(), merged.scales_zeros[:, rows].clone()
    return q


def main() -> None:
    args, engine, _ = setup(__doc__.splitlines()[0])
    if args.quant != "int4":
        raise SystemExit("--quant int4: the merge is int4's")
    model = engine.model
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            gu, sz = m._packed["gate_up_proj"], m._packed["gate_up_proj_scales_zeros"]
            I = gu.shape[1] // 2
            assert I % _packed_block() == 0
            m._packed["gate_proj"], m._packed["up_proj"] = gu[:, :I].clone(), gu[:, I:].clone()
            m.gate_proj_scales_zeros, m.up_proj_scales_zeros = sz[:, :, :I].clone(), sz[:, :, I:].clone()
        elif isinstance(m, deepseek_v3.MLP):
            object.__setattr__(m, "_gate_sep", split_qlinear(m.gate_up_proj, 0))  # not submodules: no double count
            object.__setattr__(m, "_up_sep", split_qlinear(m.gate_up_proj, 1))
    x = torch.randn(3, model.config.hidden_size, dtype=model.dtype)
    mlp = next(m for m in model.modules() if isinstance(m, deepseek_v3.MLP))
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    with torch.no_grad():  # the split weights compute what the merged ones do
        assert torch.equal(mlp(x), mlp_separate(mlp, x)) and torch.equal(experts.expert(5, x),
                                                                         expert_separate(experts, 5, x))
    saved = deepseek_v3.MLP.forward
    deepseek_v3.MLP.forward = mlp_separate
    try:
        separate = plan_with(model, RoutedExperts, "expert", expert_separate)
    finally:
        deepseek_v3.MLP.forward = saved
    compare(args, engine, separate, model._one_token_plan, ("separate gate, up", "merged gate_up"))


if __name__ == "__main__":
    main()
