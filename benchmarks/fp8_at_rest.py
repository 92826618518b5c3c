"""FP8 weights kept at rest against FP8 re-quantized to int8 at load (what `load_model` does by default): the two
products a CPU step runs, per weight byte, one process, alternating; median of repeats.

* decode (one row): the compiled multiply-sum the one-token step fuses — int8 `(q·x).sum · scale` per row, FP8
  `(w·x)` summed per 128-column block, then the 128×128 block scales (PyTorch's own e4m3 → fp32 conversion);
* prefill (a GEMM's weight): widened to bf16 — int8 `q · scale`, FP8 `routed.quant.fp8.dequantize`.

    python benchmarks/fp8_at_rest.py [--threads 2] [--repeats 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from routed.malloc import keep_freed_memory
from routed.quant import fp8
from routed.quant.intq import quantize_int8


def int8_row(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((q.float() * x.float()).sum(-1) * scale).bfloat16()


def fp8_row(w: torch.Tensor, scale_inv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    per_block = (w.float().view(N, K // 128, 128) * x.float().view(K // 128, 128)).sum(-1)  # [N, K/128]
    return (per_block.view(N // 128, 128, K // 128) * scale_inv[:, None, :]).sum(-1).view(N).bfloat16()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    N, K = 2816 * 2, 1024  # `small`'s dense gate and up
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05
    w8, scale_inv = fp8.quantize(w)
    q, scale = quantize_int8(fp8.dequantize(w8, scale_inv, (128, 128), torch.float32))
    x = torch.randn(K).bfloat16()
    cases = {
        "decode row, int8": (torch.compile(int8_row), (q, scale, x)),
        "decode row, fp8 at rest": (torch.compile(fp8_row), (w8, scale_inv, x)),
        "prefill widening, int8": (lambda q, s: q * s.bfloat16()[:, None], (q, scale)),
        "prefill widening, fp8 at rest": (lambda w, s: fp8.dequantize(w, s, (128, 128), torch.bfloat16), (w8, scale_inv)),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for fn, a in cases.values():
            fn(*a)
        for i in range(args.repeats):
            for name in (list(cases) if i % 2 else list(cases)[::-1]):
                fn, a = cases[name]
                start = time.perf_counter()
                fn(*a)
                times[name].append(time.perf_counter() - start)
    out = {name: {"us": round(statistics.median(t) * 1e6), "weight_GB_s": round(N * K / statistics.median(t) / 1e9, 1)}
           for name, t in times.items()}
    print(json.dumps({"threads": args.threads, "weight": [N, K], "median_of": args.repeats, "results": out}, indent=1))


if __name__ == "__main__":
    main()
