"""One-row bf16 products on the CPU (decode at batch 1): a compiled multiply-sum instead of eager GEMV.

PyTorch's eager bf16 matrix-vector product reads weights at ~10 GB/s on this CPU (one thread), while the same
product written as `(w.float() * x.float()).sum(-1)` and compiled by inductor into one fused, vectorised loop
reads them at ~19 GB/s (benchmarks/gemv.py, BENCHMARKS.md). `linear(x, w)` takes that path for a single row
of bf16 activations and weights on the CPU outside autograd, and `F.linear` otherwise — so prefill, batches,
fp32, quantized weights, GPUs and training are unchanged. The kernel is compiled once per process (dynamic
shapes, ~2-3 s, holding the GIL) by `enable()`, which the loader calls for models of at least
`MIN_MODEL_BYTES` of bf16 weights — below that the compile costs more than the decode it saves (the bundled
22 MB demo model stays eager). If compiling fails (no C compiler), it warns once and stays on F.linear.

Products of many rows (`gemm`, also under the int8/int4 weights widened for prefill) pad their rows to a multiple
of ROWS_MULTIPLE on the CPU: oneDNN compiles and keeps a kernel per GEMM shape (up to 1024), and a server sees a
new row count with every prompt length — on `small`, 40 prompts of 16-512 tokens grew the process by 0.39 GB.

Half-precision products are native only on CPUs with AVX512-BF16 or AMX. Elsewhere (AVX2: AMD Zen 2/3, Intel
before Cooper Lake) oneDNN emulates them at a fifth of fp32's rate (2816×1024, 512 rows, 2 threads, Zen 3: bf16
18 GFLOPS, fp32 92), so there products of FP32_ROWS rows or more run in fp32 (`product_dtype`): the activations
widened, the weight widened a chunk of rows at a time (`widened_gemm`), the result rounded back to the
activations' dtype — what a bf16 GEMM computes (bf16 inputs, fp32 sums), in another order of summation.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from routed.quant import kernels

log = logging.getLogger(__name__)
MIN_MODEL_BYTES = 256 * 2**20
ROWS_MULTIPLE = 16  # `gemm`: row counts from this on are padded to a multiple of it (fewer: a decode batch's)
# dtypes whose CPU GEMMs (oneDNN) compile and keep a kernel per shape, so their row counts are padded (fp32 runs
# on MKL: no kernel per shape, and its rounding follows the row count)
PADDED_DTYPES = (torch.bfloat16, torch.float16)
# From this many rows on, a half-precision product on a CPU without native ones runs in fp32 (`product_dtype`)
FP32_ROWS = 8
# Up to this many rows (a batched decode step's), bf16 products where routed's `bf16_dot` is built (AVX2) run
# through it: each weight row read from memory once for all the rows, each row summed as it would be alone
BF16_DOT_ROWS = 16
# A weight widened for a GEMM is widened in row chunks of about this many weights, so the transients stay a few
# MB whatever the weight (DeepSeek-V3's o_proj, 117 M weights, widened whole to bf16 through int4's fp32 steps:
# ~1.2 GB at once). `small`'s experts (1 M weights each) take one chunk; its dense MLP (5.8 M) six.
DEQUANT_CHUNK = 2**20
_state: dict[str, object] = {"kernel": None, "disabled": False}


@functools.cache
def native_half_products(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bf16 or fp16) natively: bf16 with AVX512-BF16 or AMX tiles, fp16
    with AMX-FP16 (see the module docstring)."""
    if dtype == torch.float16:
        return bool(torch.cpu._is_amx_fp16_supported())
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU's products of many `dtype` rows run in: float32 for half precision on a CPU without
    native half-precision products, else `dtype` itself."""
    return torch.float32 if dtype in PADDED_DTYPES and not native_half_products(dtype) else dtype


def product_dtype(x: torch.Tensor, rows: int | None = None) -> torch.dtype:
    """The dtype a product of x's `rows` (default: all of x's rows) runs in: `wide_dtype` from FP32_ROWS rows on
    the CPU, else x's own."""
    rows = x.numel() // x.shape[-1] if rows is None else rows
    return wide_dtype(x.dtype) if x.device.type == "cpu" and rows >= FP32_ROWS else x.dtype


def _gemv(x_K: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    return (w_NK.float() * realized(x_K).float()).sum(-1).to(x_K.dtype)


def realized(x: torch.Tensor) -> torch.Tensor:
    """x itself; inside a compiled region, as a buffer of its own for the fused multiply-sum that reads it.

    Inductor inlines a pointwise producer into its consumer's loop: an RMSNorm's output (residual add, rsqrt,
    weight, rounding) feeding a one-row product was recomputed for every output row inside the product's inner
    loop, which then loaded and converted three vectors per weight vector instead of one. `as_strided` is
    lowered by realizing its input, so the norm is computed once and the product reads its bf16 result — as
    eager does (a norm into a 1536 x 1024 GEMV, cold: 0.80-0.87x the time; `small` bf16 decode 1.04x)."""
    return x.as_strided(x.shape, x.stride()) if torch.compiler.is_compiling() else x


def enable() -> bool:
    """Compile the kernel (once per process) and use it from now on; True if it is in use."""
    if _state["kernel"] is None and not _state["disabled"]:
        try:
            kernel = torch.compile(_gemv, dynamic=True)
            w = torch.zeros(64, 128, dtype=torch.bfloat16)  # a weight, made as the loader makes them
            with torch.inference_mode():
                kernel(torch.zeros(128, dtype=torch.bfloat16), w)
            _state["kernel"] = kernel
        except Exception as e:  # noqa: BLE001 — no compiler, or inductor refuses: the eager path is correct
            _state["disabled"] = True
            log.warning("compiled bf16 GEMV unavailable (%s); using F.linear", str(e).splitlines()[0][:200])
    return _state["kernel"] is not None


def takes_gemv(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (_state["kernel"] is not None and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and x.device.type == "cpu" and x.numel() == w.shape[-1] and w.dim() == 2 and not torch.is_grad_enabled())


def takes_bf16_dot(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Up to BF16_DOT_ROWS bf16 rows against a contiguous bf16 weight on a CPU where routed's `bf16_dot` is built
    (AVX2)."""
    return (kernels.BF16_DOT and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and w.dim() == 2 and x.shape[-1] == w.shape[-1] and x.numel() <= BF16_DOT_ROWS * w.shape[-1]
            and w.is_contiguous() and not torch.is_grad_enabled())


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), through routed's `bf16_dot` (AVX2 CPUs, `routed.quant.kernels`) or else the compiled
    GEMV when enabled and x is one bf16 row on the CPU.

    Inside a compiled region (the one-token block of `Transformer.compile_decode`) a one-row product is
    written as the multiply-sum itself, so the compiler fuses it with what surrounds it — or calls `bf16_dot`,
    which reads the weight at ~1.2-1.4x the fused loop's rate on AVX2 (BENCHMARKS.md)."""
    if bias is None and takes_bf16_dot(x, w):
        return torch.ops.routed.bf16_dot(x, w)
    if bias is None and torch.compiler.is_compiling() and x.numel() == w.shape[-1] and w.dim() == 2:
        return _gemv(x.reshape(-1), w).view(*x.shape[:-1], w.shape[0])  # fused into the compiled region
    if bias is None and takes_gemv(x, w):
        return _state["kernel"](x.reshape(-1), w.detach()).view(*x.shape[:-1], w.shape[0])  # type: ignore[operator]
    return gemm(x, w, bias)


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias); in inference on the CPU with half-precision weights (oneDNN's GEMMs) and
    ROWS_MULTIPLE rows or more, computed over x's rows padded with zeros to a multiple of ROWS_MULTIPLE, so the
    shapes a process meets fall into few buckets (see the module docstring). The padding costs a copy of x."""
    rows = x.numel() // x.shape[-1]
    if w.dtype in PADDED_DTYPES and (dt := product_dtype(x, rows)) != w.dtype and not torch.is_grad_enabled():
        y = widened_gemm(x.to(dt), lambda n0, n1: w[n0:n1].to(dt), w.shape[0]).to(x.dtype)
        return y if bias is None else y + bias
    pad = -rows % ROWS_MULTIPLE
    if (pad == 0 or rows < ROWS_MULTIPLE or x.device.type != "cpu" or w.dtype not in PADDED_DTYPES
            or torch.is_grad_enabled()):
        return F.linear(x, w, bias)
    x_padded = torch.cat([x.reshape(rows, x.shape[-1]), x.new_zeros(pad, x.shape[-1])])
    return F.linear(x_padded, w, bias)[:rows].view(*x.shape[:-1], w.shape[0])


def widened_gemm(x: torch.Tensor, widen: Callable[[int, int], torch.Tensor], out_features: int,
                 align: int = 1) -> torch.Tensor:
    """x Wᵀ for a W stored narrower than x (quantized, or half precision under fp32 products), widened to x's
    dtype for the GEMM a row chunk at a time: `widen(n0, n1)` gives W[n0:n1] (chunks of a multiple of `align`
    rows, at most about DEQUANT_CHUNK weights each, and of even sizes: no short last chunk of one block, which
    the compiled int4 widening would compile again for). fp32 x of at most ROWS_MULTIPLE rows (a batched decode
    step's, on a CPU without native bf16 products) multiplies as W xᵀ, its few rows the narrow side: MKL's fp32
    GEMM of 8 rows by a 1024x1024 chunk runs ~1.3-2x faster that way, bf16 `small` decode b8 1.36x
    (`benchmarks/code_ab.py --decode-batch 8 --swap routed/model/gemv.py:widened_gemm`, Zen 3: 20.5 -> 27.5 tok/s),
    b16 1.38x (27 -> 37)."""
    most = max(align, DEQUANT_CHUNK // x.shape[-1] // align * align)
    rows = x.numel() // x.shape[-1]
    if rows <= ROWS_MULTIPLE and x.dtype == torch.float32 and x.device.type == "cpu":
        x2 = x.reshape(rows, x.shape[-1]).t()

        def product(w: torch.Tensor) -> torch.Tensor:  # W x^T: few rows as the narrow side; row-major out, as gemm's
            return torch.mm(w, x2).t().contiguous().view(*x.shape[:-1], w.shape[0])
    else:
        def product(w: torch.Tensor) -> torch.Tensor:
            return gemm(x, w)
    if out_features <= most:
        return product(widen(0, out_features))
    chunks = -(-out_features // most)
    step = -(-out_features // chunks // align) * align
    out = x.new_empty(*x.shape[:-1], out_features)
    for n0 in range(0, out_features, step):
        n1 = min(out_features, n0 + step)
        out[..., n0:n1] = product(widen(n0, n1))
    return out


class Linear(nn.Linear):
    """nn.Linear whose one-row bf16 CPU products take the compiled GEMV (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
