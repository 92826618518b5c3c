"""Decode at batch 1 in one process, interleaved: the compiled step with only the sizes that change between
steps symbolic (the context's keys, the cache's slots: routed's `compile_decode`) against every size symbolic
(`torch.compile(dynamic=True)`, before: each weight's sizes became graph inputs too, ~110 per call, read from
the tensors and, with inductor's C++ wrapper, wrapped into tensors on every call).

    python benchmarks/decode_sizes_ab.py --model checkpoints/small --rounds 8 [--quant int8|int4]
"""

from __future__ import annotations

import torch

from compiled_plans import compare, plan_with, setup  # benchmarks/compiled_plans.py
from routed.model import deepseek_v3


def all_sizes_symbolic(model: deepseek_v3.Transformer):
    def compiled_blocks_fn(name: str):
        own = deepseek_v3.own_copy(deepseek_v3._run_blocks, f"{name}_all_dynamic_{id(model):x}")
        int4 = any(getattr(getattr(m, "fmt", None), "bits", None) == 4 for m in model.model.layers.modules())
        return torch.compile(own, dynamic=True, options={"guard_filter_fn": deepseek_v3._decode_guards,
                                                         "cpp_wrapper": int4})
    return compiled_blocks_fn


def main() -> None:
    args, engine, _ = setup(__doc__.splitlines()[0])
    model = engine.model
    before = plan_with(model, model, "compiled_blocks_fn", all_sizes_symbolic(model))
    compare(args, engine, before, model._one_token_plan, ("every size symbolic", "changing sizes symbolic"))


if __name__ == "__main__":
    main()
