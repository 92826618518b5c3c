"""Where a compiled one-token step's blocks spend their time: each part of a block compiled on its own over all
MoE layers (so its weights come from memory, not cache), against a sweep over the same bytes.

Each part runs one token through every MoE layer of the model (a context of --context keys, routing telemetry
off), compiled by inductor as the decode step is; its weight bytes over its time give the rate it reads them
at, beside `torch.sum` over a buffer of the layers' total weight bytes (this machine's copy bandwidth, in the
same round). A part far below the sweep is where the step loses time beyond its bytes' floor.

    python benchmarks/decode_parts.py --model checkpoints/small [--context 40] [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from routed.errors import RoutedError
from routed.loader import load_model
from routed.malloc import keep_freed_memory
from routed.model.attention import PagedBatch, paged_attention
from routed.model.deepseek_v3 import MoE, Transformer


def parts(model: Transformer, context: int) -> tuple[dict, dict]:
    """{part: fn(blocks)} and {part: weight bytes per layer} for one token at position context - 1."""
    cfg = model.config
    cache = model.new_cache(context + 8)
    batch = PagedBatch(cache, torch.tensor([context - 1]), [(0, 1)], [torch.arange(context)])
    pos = torch.tensor([[context - 1]])
    rope = model.rotary(pos)
    dtype = model.dtype
    h = torch.randn(1, 1, cfg.hidden_size, dtype=dtype)
    H, N, R, L = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q_nope, q_pe = torch.randn(1, 1, H, N, dtype=dtype), torch.randn(1, 1, H, R, dtype=dtype)
    latent = torch.randn(1, 1, L + R, dtype=dtype)
    o_in = torch.randn(1, 1, H * cfg.v_head_dim, dtype=dtype)
    K = cfg.num_experts_per_tok
    ids = torch.arange(K).mul(cfg.n_routed_experts // K).unsqueeze(0)  # spread over the experts
    w = torch.full((1, K), 1.0 / K)

    def nbytes(*tensors: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def attention(blocks):  # norm, projections, RoPE, cache write, absorbed attention, o_proj
        x = h
        for b in blocks:
            x = x + b.self_attn(b.input_layernorm(x), rope, pos, batch, b.index, "auto")
        return x

    def projections(blocks):  # q_a -> norm -> q_b, and kv_a
        out = []
        for b in blocks:
            a, x = b.self_attn, b.input_layernorm(h)
            out.append(a.q_b_proj(a.q_a_layernorm(a.q_a_proj(x))).float().sum() + a.kv_a_proj_with_mqa(x).float().sum())
        return torch.stack(out)

    def core(blocks):  # cache write, W_UK fold, scores over the keys, softmax, W_UV
        out = []
        for b in blocks:
            a = b.self_attn
            kv_b = a.kv_b_proj.weight.view(H, N + cfg.v_head_dim, L)
            out.append(paged_attention("auto", b.index, batch, q_nope, q_pe, latent, pos, kv_b, a.scale).float().sum())
        return torch.stack(out)

    def o_proj(blocks):
        return torch.stack([b.self_attn.o_proj(o_in).float().sum() for b in blocks])

    def router(blocks):
        return torch.stack([b.mlp.gate(h.view(1, -1))[1] for b in blocks])

    def shared(blocks):
        return torch.stack([b.mlp.shared_experts(h).float().sum() for b in blocks])

    def routed_experts(blocks):  # K experts per layer, chosen ids fixed
        return torch.stack([b.mlp.experts(h.view(1, -1), ids, w)[0].float().sum() for b in blocks])

    def block(blocks):
        x = h
        for b in blocks:
            x = b(x, rope, pos, batch, b.index, "auto")
        return x

    b = next(layer for layer in model.model.layers if isinstance(layer.mlp, MoE))
    a, m = b.self_attn, b.mlp
    expert = nbytes(m.experts.gate_proj[0], m.experts.up_proj[0], m.experts.down_proj[0])
    sizes = {"projections": nbytes(a.q_a_proj.weight, a.q_b_proj.weight, a.kv_a_proj_with_mqa.weight),
             "core": nbytes(a.kv_b_proj.weight), "o_proj": nbytes(a.o_proj.weight),
             "router": nbytes(m.gate.weight), "shared": sum(nbytes(p) for p in m.shared_experts.parameters()),
             "routed_experts": K * expert}
    sizes["attention"] = sizes["projections"] + sizes["core"] + sizes["o_proj"]
    sizes["block"] = sizes["attention"] + sizes["router"] + sizes["shared"] + sizes["routed_experts"]
    fns = {"attention": attention, "projections": projections, "core": core, "o_proj": o_proj, "router": router,
           "shared": shared, "routed_experts": routed_experts, "block": block}
    return fns, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", type=int, default=40, help="keys the token attends over (default 40)")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    try:
        model = load_model(args.model, "bf16", progress=False)
    except RoutedError as e:
        raise SystemExit(f"error: {e}") from None
    if model.config.q_lora_rank is None or not any(isinstance(x.mlp, MoE) for x in model.model.layers):
        raise SystemExit("error: this script needs a model with q_lora_rank and MoE layers (V3-style)")
    for module in model.modules():
        if hasattr(module, "counting"):
            module.counting = False
    blocks = tuple(x for x in model.model.layers if isinstance(x.mlp, MoE))
    for i, x in enumerate(model.model.layers):
        x.index = i
    fns, sizes = parts(model, args.context)
    compiled = {name: torch.compile(fn, dynamic=True) for name, fn in fns.items()}  # as the decode step
    sweep = torch.ones(len(blocks) * sizes["block"] // 2, dtype=torch.bfloat16)

    def once(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    # this VM's bandwidth changes by 2x within a minute: every round times each part and then the sweep, and
    # each part's rate is read against the sweep of its own round
    seconds: dict[str, list[float]] = {name: [] for name in [*compiled, "sweep"]}
    with torch.inference_mode():
        for _ in range(3):  # warm-up (the first call compiles)
            for fn in compiled.values():
                fn(blocks)
            sweep.sum()
        for _ in range(args.repeats):
            for name, fn in compiled.items():
                seconds[name].append(once(lambda f=fn: f(blocks)))
            seconds["sweep"].append(once(sweep.sum))
    sweep_gbs = [sweep.numel() * 2 / s / 1e9 for s in seconds["sweep"]]
    gbs = {name: [len(blocks) * sizes[name] / s / 1e9 for s in seconds[name]] for name in sizes}
    print(json.dumps({"layers": len(blocks), "context": args.context, "threads": args.threads,
                      "MB per layer": {k: round(v / 1e6, 2) for k, v in sizes.items()},
                      "ms (all layers), median": {k: round(statistics.median(v) * 1e3, 3) for k, v in seconds.items()},
                      "GB/s, median": {k: round(statistics.median(v), 1) for k, v in gbs.items()},
                      "sweep GB/s, median and range": [round(statistics.median(sweep_gbs), 1), round(min(sweep_gbs), 1),
                                                       round(max(sweep_gbs), 1)],
                      "fraction of the round's sweep, median": {
                          k: round(statistics.median(g / w for g, w in zip(v, sweep_gbs)), 2) for k, v in gbs.items()}},
                     indent=2))

if __name__ == "__main__":
    main()
