"""What a real GPU gives the planner's GPU presets: copy bandwidth, bf16 and fp8 matrix rates, and the two
decode-time kernels of DeepSeek-V3 at its real sizes — one MoE layer's routed experts (grouped GEMMs over the
experts a batch touches) and the absorbed MLA attention over a batch's latent cache — as bytes per second
against the measured copy bandwidth (the η_mem the planner assumes) and FLOP/s against the matrix rate.

Plain PyTorch only (torch._grouped_mm where the GPU has it, else a loop over the touched experts), so the
figures are what PyTorch-level kernels reach, not DeepGEMM or FlashMLA. Run on the GPU machine:

    python3 benchmarks/gpu_probe.py --out $OUT/gpu_probe.json
    python benchmarks/gpu_probe.py --device cpu --scale 0.05      # a smoke test of the script here
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def timer(device: str) -> Callable[[Callable[[], object], int], float]:
    def median_s(fn: Callable[[], object], repeats: int = 10) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return median_s


def grouped_experts(x_MD: torch.Tensor, offs: torch.Tensor, counts: list[int], w13_EXD: torch.Tensor,
                    w2_EDI: torch.Tensor, grouped: bool) -> torch.Tensor:
    """SwiGLU experts over tokens sorted by expert (weights [E, out, in], as checkpoints hold them): grouped
    GEMMs (one launch per projection) or a loop over the touched experts."""
    if grouped:
        h = torch._grouped_mm(x_MD, w13_EXD.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(g) * u).contiguous(), w2_EDI.transpose(-2, -1), offs=offs)
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            h = x_MD[start : start + n] @ w13_EXD[e].T
            g, u = h.chunk(2, dim=-1)
            out.append((F.silu(g) * u) @ w2_EDI[e].T)
            start += n
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every size (smoke tests)")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev, sc = args.device, args.scale
    median_s = timer(dev)
    out: dict[str, object] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                              "torch": torch.__version__}

    # copy bandwidth (bytes read + written)
    n = int(2**30 * sc)  # 1 GiB of bf16 values: 2 GiB read, 2 GiB written
    a, b = torch.empty(n, dtype=torch.bfloat16, device=dev), torch.empty(n, dtype=torch.bfloat16, device=dev)
    copy_gbs = 4 * n / median_s(lambda: b.copy_(a)) / 1e9
    out["copy_gb_s"] = copy_gbs
    del a, b

    # matrix rates
    m = max(256, int(8192 * sc) // 256 * 256)
    x, y = torch.randn(m, m, device=dev, dtype=torch.bfloat16), torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    out["bf16_tflops"] = 2 * m**3 / median_s(lambda: x @ y) / 1e12
    if dev == "cuda":
        try:
            x8, y8 = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn).t().contiguous().t()
            one = torch.ones((), device=dev)
            out["fp8_tflops"] = 2 * m**3 / median_s(
                lambda: torch._scaled_mm(x8, y8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e12
        except Exception as e:  # noqa: BLE001 — report, keep going
            out["fp8_tflops"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    del x, y

    # one DeepSeek-V3 MoE layer's routed experts at decode: E 256, D 7168, I 2048, top-8, bf16 weights
    E, D, I, K = 256, max(64, int(7168 * sc) // 64 * 64), max(64, int(2048 * sc) // 64 * 64), 8
    w13 = torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16)  # gate and up stacked, [E, out, in]
    w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    moe = []
    grouped = dev == "cuda" and hasattr(torch, "_grouped_mm")
    if grouped:  # check it against the loop once, on a few tokens
        try:
            ids = torch.randint(0, E, (64,), generator=g)
            counts_t = torch.bincount(ids.sort().values, minlength=E)
            offs = torch.cumsum(counts_t, 0).to(torch.int32).to(dev)
            xs = torch.randn(64, D, device=dev, dtype=torch.bfloat16) * 0.05
            a = grouped_experts(xs, offs, counts_t.tolist(), w13, w2, True).float()
            b = grouped_experts(xs, offs, counts_t.tolist(), w13, w2, False).float()
            out["grouped_mm_rel_err"] = float((a - b).abs().max() / b.abs().max())
        except Exception as e:  # noqa: BLE001 — fall back to the loop, and say so
            grouped, out["grouped_mm"] = False, f"unavailable: {str(e).splitlines()[0][:160]}"
    out["moe_kernel"] = "torch._grouped_mm" if grouped else "loop over touched experts"
    for tokens in (1, 8, 32, 64, 128, 256, 512):
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).flatten()
        counts_t = torch.bincount(ids, minlength=E)
        counts = counts_t.tolist()
        offs = torch.cumsum(counts_t, 0).to(torch.int32).to(dev)
        xs = torch.randn(tokens * K, D, device=dev, dtype=torch.bfloat16)
        seconds = median_s(lambda: grouped_experts(xs, offs, counts, w13, w2, grouped), 20)
        touched = sum(c > 0 for c in counts)
        weight_bytes = touched * 3 * D * I * 2
        flops = 2 * tokens * K * 3 * D * I
        moe.append({"tokens": tokens, "experts_touched": touched, "us": seconds * 1e6,
                    "weight_gb_s": weight_bytes / seconds / 1e9, "eta_mem": weight_bytes / seconds / 1e9 / copy_gbs,
                    "tflops": flops / seconds / 1e12})
    out["moe_layer_v3_bf16"] = moe
    del w13, w2

    # absorbed MLA decode attention over the latent cache: H 128, latent 512 + rope 64, context ~4,989
    H, L, R, S = 128, 512, 64, max(64, int(4989 * sc))
    mla = []
    for batch in (1, 32, 128):
        cache = torch.randn(batch, S, L + R, device=dev, dtype=torch.bfloat16)
        q = torch.randn(batch, H, L + R, device=dev, dtype=torch.bfloat16)

        def attend() -> torch.Tensor:
            scores = torch.einsum("bhc,bsc->bhs", q, cache).float() * 0.07
            return torch.einsum("bhs,bsl->bhl", scores.softmax(-1).to(cache.dtype), cache[..., :L])

        def sdpa() -> torch.Tensor:  # one latent "head" shared by the H query heads (MQA through enable_gqa)
            k = cache.unsqueeze(1)
            return F.scaled_dot_product_attention(q.unsqueeze(2), k, k[..., :L], scale=0.07, enable_gqa=True)

        cache_bytes = batch * S * (L + R) * 2
        for name, fn in (("einsum", attend), ("sdpa", sdpa)):
            try:
                seconds = median_s(fn, 20)
            except Exception as e:  # noqa: BLE001 — a kernel PyTorch lacks here: say so
                mla.append({"kernel": name, "batch": batch, "error": str(e).splitlines()[0][:160]})
                continue
            mla.append({"kernel": name, "batch": batch, "context": S, "us": seconds * 1e6,
                        "cache_gb_s": cache_bytes / seconds / 1e9, "eta_mem": cache_bytes / seconds / 1e9 / copy_gbs})
        del cache, q
    out["mla_absorbed_decode"] = mla
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
