"""Weight-only integer formats (data + pure functions) and the PyTorch CPU kernels that run them.

* int8: symmetric per output channel. `W[n, k] ≈ q[n, k] · scale[n]`, q int8 in [-127, 127]. Matmul with
  `aten._weight_int8pack_mm(x, q, scale)` (reads one byte per weight).
* int4: asymmetric per group of `group_size` input channels. `W[n, k] ≈ (q[n, k] − 8) · s[g, n] + z[g, n]`
  with q in 0..15, g = k // group_size, z = min + 8 s. Stored as two nibbles per byte, uint8 [N, K/2]
  (column 2j in the low nibble, 2j+1 in the high one), plus bf16 `scales_zeros` [K/group_size, N, 2];
  repacked at load into the layout of `aten._weight_int4pack_mm_for_cpu`.

int8 scales are held in the model's dtype once loaded (`finalize_model`). A compiled one-token step runs int8
products as fused multiply-sums where the CPU has AVX-512 (`FUSED_INT8_LOADS`). Products of a few rows, and every
one-row product without AVX-512, run on routed's own `int8_dot` where it is built (AVX2 CPUs: 8-bit activations
per block of 32 and integer dot products, `routed.quant.kernels`), else on `_weight_int8pack_mm`.

Activations stay in the model dtype — except in `int8_dot` (above), and at an int8 lm_head where it is not built,
whose products quantize each row of activations to 8 bits to run as FBGEMM's integer dot products
(`int8_rows_linear`: the lm_head is 55% of a small model's decode bytes, and the weight-only int8 kernel is
compute-bound there). Which weights are quantized (every linear in
attention and feed-forward, experts and lm_head; not the router, not `kv_b_proj`, whose halves the absorbed
attention folds into the query and output) is decided by `routed.quant.linear`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from routed.model.gemv import product_dtype, realized, widened_gemm
from routed.quant import kernels

log = logging.getLogger(__name__)
INNER_K_TILES = 2
# From this many rows on, widening the weight to the activations' dtype and one float GEMM beat the int kernels
# (one thread, 2816×1024: int8 2.2 vs 2.5 ms at 32 rows, 8.3 vs 20.2 at 256. int4, 2 threads, 512×1024 per
# call: the kernel ~6.3 µs per row; widening ~130-200 µs compiled (`enable_widen`; ~300 eager) + the bf16 GEMM
# ~2.6 µs per row. A 512-token prefill's experts on `small`, widened from 96, 64, 48 or 32 rows on: 427, 431, 437,
# 437 ms — the widened weight leaves the cache between experts). Prefill's dense products take it; most
# experts' do not.
DEQUANT_ROWS_INT8 = 32
# `_weight_int8pack_mm` reads its weight's rows in steps of 16: with in_features not a multiple of it, it returns
# garbage or NaN, or crashes (torch 2.13, this CPU). Such weights take the widened GEMM whatever their rows.
INT8_KERNEL_K_MULTIPLE = 16
DEQUANT_ROWS_INT4 = 96
# Whether a compiled one-token step runs its int8 products as fused multiply-sums (AVX-512) or through
# `_weight_int8pack_mm` (AVX2). Inductor loads int8 a vector of 16 at a time, and ATen's AVX2 int8 vector (32
# lanes) takes a partial load through a scalar copy: the fused loop reads ~2 GB/s there (11264x1024, one row, 2
# threads, Zen 3: 6.1 ms; the kernel 1.1 ms, cold from memory ~6 GB/s). int8 decode on `small`, same CPU:
# 12.6 -> 24.7-31.7 tok/s. With AVX-512 the fused loop reads at the bandwidth (a masked load) and stays.
FUSED_INT8_LOADS = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@dataclass(slots=True, frozen=True)
class IntFormat:
    bits: int  # 8 or 4
    group_size: int = 32  # int4 only

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group_size must be 32, 64, 128 or 256, got {self.group_size}")

    def as_config(self) -> dict:
        return {"quant_method": "routed", "bits": self.bits, "group_size": self.group_size}


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """The int4 CPU kernel needs N % 16 == 0 and K a multiple of the group; other weights stay float."""
    return out_features % 16 == 0 and in_features % group_size == 0


def quantize_int8(w: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scale fp32 [N]); in row chunks so a huge lm_head needs no fp32 copy."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for start in range(0, w.shape[0], rows_per_chunk):
        wf = w[start : start + rows_per_chunk].float()
        s = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q[start : start + rows_per_chunk] = (wf / s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scale[start : start + rows_per_chunk] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def quantize_int4(w: torch.Tensor, group_size: int, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (nibbles uint8 [N, K/2], scales_zeros bf16 [K/group, N, 2]), in row chunks."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the int4 group size {group_size}")
    nibbles = torch.empty(N, K // 2, dtype=torch.uint8)
    scales_zeros = torch.empty(K // group_size, N, 2, dtype=torch.bfloat16)
    for start in range(0, N, rows_per_chunk):
        end = min(N, start + rows_per_chunk)
        wg = w[start:end].float().view(end - start, K // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).view(end - start, K)
        nibbles[start:end] = q[:, 0::2] | (q[:, 1::2] << 4)
        scales_zeros[:, start:end] = torch.stack([scale.T, (lo + 8 * scale).T], dim=-1).to(torch.bfloat16)
    return nibbles, scales_zeros


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> values 0..15 as uint8 [N, K]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(nibbles: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_nibbles(nibbles)
    N, K = q.shape
    sz = scales_zeros.float()
    scale, zero = sz[..., 0].T, sz[..., 1].T  # [N, K/group]
    qg = q.float().view(N, K // group_size, group_size)
    return ((qg - 8) * scale[..., None] + zero[..., None]).view(N, K)


def pack_int4(nibbles: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """Stored nibbles -> the int4 CPU kernel's weight layout, in row chunks: the kernel's packing takes one int32
    per weight (a 129280-row lm_head: 0.53 GB at once, the peak of loading an int4 `small`), and its layout keeps
    rows in blocks of at most 128 (`_packed_block`), so chunks of a multiple of that concatenate to the whole."""
    out = torch.empty(nibbles.shape, dtype=torch.uint8)
    for start in range(0, nibbles.shape[0], rows_per_chunk):
        chunk = unpack_nibbles(nibbles[start : start + rows_per_chunk]).to(torch.int32)
        out[start : start + rows_per_chunk] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, INNER_K_TILES)
    return out


def _packed_block() -> int | None:
    """Rows per block of the int4 CPU kernel's layout on this CPU (its packing is by instruction set): the
    packed [N, K/2] bytes are [N/B, K, B/2], byte (b, k, j) holding row b·B + j in its low nibble and row
    b·B + B/2 + j in its high one. Found once by packing a known matrix; None if no such layout fits."""
    if "block" not in _PACKED:
        q = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        packed = pack_int4(q[:, 0::2] | (q[:, 1::2] << 4))
        _PACKED["block"] = next((b for b in (16, 32, 64, 128) if torch.equal(_unpack_packed(packed, b, 128, 64), q)),
                                None)
    return _PACKED["block"]


_PACKED: dict[str, int | None] = {}


def _unpack_packed(packed: torch.Tensor, block: int, N: int, K: int) -> torch.Tensor:
    v = packed.reshape(N // block, K, block // 2)
    return torch.cat([v & 0xF, v >> 4], dim=-1).transpose(1, 2).reshape(N, K)


def _widen_blocks(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel layout's bytes `v` [N/B, G, group, B/2] (byte (b, k, j): row b·B + j low, b·B + B/2 + j high)
    and fp32 scales `s`, zeros `z` [G, 1, N/B, 2, B/2] -> Wᵀ [G, group, N/B, 2, B/2] (= [K, N]) of `dtype`:
    (q − 8)·s + z in fp32 (the product exact: an 8-bit mantissa times 4 bits), rounded once. Every operand runs
    along the same innermost B/2 elements, so inductor compiles it into one vectorised loop (`enable_widen`)."""
    v = v.permute(1, 2, 0, 3)  # [G, group, N/B, B/2]
    q = torch.stack([(v & 0xF).float() - 8, (v >> 4).float() - 8], dim=3)
    return torch.addcmul(z, q, s).to(dtype)


_WIDEN: dict[str, Callable | None] = {"kernel": None}


def enable_widen(dtype: torch.dtype, group_size: int) -> bool:
    """Compile `_widen_blocks` (once per process: ~13 s the first time on a machine, then from inductor's disk
    cache, ~1 s more per load beside the decode step's compile) and widen int4 weights through it from now on:
    1.4-1.9x the same function eager (`python benchmarks/int4_widen.py`), int4 prefill 1.08-1.22x on `small`
    (`benchmarks/code_ab.py`). Its sizes are symbolic but the group and block: one graph for every weight shape
    of at least two blocks and two groups (a smaller one is widened eager), compiled here; one more on the first
    call with another group size or dtype, or outside inference mode. False (eager) if compiling fails."""
    if _WIDEN["kernel"] is None and _packed_block() is not None:
        try:
            _WIDEN["kernel"] = torch.compile(_widen_blocks, dynamic=False)  # the sizes: marked dynamic per call
            # a weight made as the loader makes them, widened as the engine runs (in inference mode): the graph
            # guards on both. 2 blocks of rows, 3 groups: sizes apart, so that no guard ties them together
            N = 2 * _packed_block()
            packed, scales_zeros = torch.zeros(N, 3 * group_size // 2, dtype=torch.uint8), torch.ones(3, N, 2)
            with torch.inference_mode():
                widen_int4(packed, scales_zeros.bfloat16(), dtype)
        except Exception as e:  # noqa: BLE001 — no compiler, or inductor refuses: the eager path is correct
            _WIDEN["kernel"] = None
            log.warning("compiled int4 widening unavailable (%s); eager", str(e).splitlines()[0][:200])
    return _WIDEN["kernel"] is not None


def widen_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A kernel-layout int4 weight [N, K/2] (scales and zeros [K/group, N, 2]) as Wᵀ [K, N] of `dtype`, or None if
    the layout is unknown or N is not a multiple of its block. Equal to `dequantize_int4` of the stored nibbles
    (bitwise in fp32), compiled or eager."""
    block = _packed_block()
    (N, half_K), G = packed.shape, scales_zeros.shape[0]
    if block is None or N % block:
        return None
    v = packed.contiguous().view(N // block, G, 2 * half_K // G, block // 2)
    s, z = (scales_zeros[..., i].float().view(G, 1, N // block, 2, block // 2) for i in (0, 1))
    kernel = _WIDEN["kernel"]
    if kernel is None or N // block < 2 or G < 2:  # the graph's sizes are >= 2 (1 would be specialised on)
        return _widen_blocks(v, s, z, dtype).view(2 * half_K, N)
    for t, dims in ((v, (0, 1)), (s, (0, 2)), (z, (0, 2))):  # blocks and groups: symbolic
        for d in dims:
            torch._dynamo.mark_dynamic(t, d)
    return kernel(v, s, z, dtype).view(2 * half_K, N)


def dequantize_packed_int4(packed: torch.Tensor, scales_zeros: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor | None:
    """The kernel-layout int4 weight as a dense [N, K] tensor of `dtype` (the [N, K] view of `widen_int4`'s
    [K, N], which F.linear takes without a copy), or None if the layout is unknown."""
    wt = widen_int4(packed, scales_zeros, dtype)
    return None if wt is None else wt.t()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    if torch.compiler.is_compiling() and x.numel() == q.shape[-1] and FUSED_INT8_LOADS:  # one row, compiled: fused
        return ((q.float() * realized(x.reshape(-1)).float()).sum(-1) * scale.to(x.dtype).float()).to(x.dtype).view(
            *shape[:-1], q.shape[0])
    # a GEMM, or a weight the int8 kernel cannot take: widen the weight, then the float matmul
    if x.numel() >= DEQUANT_ROWS_INT8 * q.shape[-1] or q.shape[-1] % INT8_KERNEL_K_MULTIPLE:
        dt = product_dtype(x)  # fp32 on a CPU without native bf16 products (gemv.wide_dtype)
        s = scale.to(dt)[:, None]  # one pass (int8 x bf16 promotes): 0.64x the time of two
        return widened_gemm(x.to(dt), lambda n0, n1: q[n0:n1] * s[n0:n1], q.shape[0]).to(x.dtype)
    if q.shape[-1] % 32 == 0 and (kernels.INT8_DOT if torch.compiler.is_compiling() else kernels.int_dot()):
        return torch.ops.routed.int8_dot(x, q, scale)  # AVX2: 8-bit activations, integer dot products
    # the kernel takes scales of x's dtype; in a compiled step, inductor's lowering of it only as they are held
    # (a converted copy fails it): the loaded model holds them so (`finalize_model`)
    s = scale if scale.dtype == x.dtype else scale.to(x.dtype)
    out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), q, s)
    return out.view(*shape[:-1], q.shape[0])


def quantize_activations_q8(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> int8 [M, K] and fp32 steps [M, K/block]: each block of `block` activations rounded to steps of
    max|x|/127 (to nearest, ties to even), as `int8_dot` quantizes them (llama.cpp's Q8_0 activations)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(xb * inv).to(torch.int8).reshape(M, K), (amax / 127.0).squeeze(-1)


def int8_dot_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The slow twin of `torch.ops.routed.int8_dot`: x's rows quantized per block (`quantize_activations_q8`),
    each block's dot product with the int8 weight exact (integers), summed with the blocks' steps, times the
    weight's row scale; in float64, returned in x's dtype."""
    shape, (N, K) = x.shape, q.shape
    xq, d = quantize_activations_q8(x.reshape(-1, K), block)
    nb = K // block
    dots = torch.einsum("mbi,nbi->mnb", xq.view(-1, nb, block).double(), q.view(N, nb, block).double())  # exact
    y = (dots * d.double()[:, None, :]).sum(-1) * scale.float().double()
    return y.to(x.dtype).view(*shape[:-1], N)


def int4_dot_reference(x: torch.Tensor, nibbles: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                       block: int = 32) -> torch.Tensor:
    """The slow twin of `torch.ops.routed.int4_dot`, from the stored nibbles: per block of 32 activations,
    s · step · Σ (q − 8) xq + z · Σ x (exact integers; the zero term from x's float sum), in float64."""
    shape, (N, half_K) = x.shape, nibbles.shape
    K = 2 * half_K
    x2 = x.reshape(-1, K)
    xq, d = quantize_activations_q8(x2, block)
    nb = K // block
    q = unpack_nibbles(nibbles).double().view(N, nb, block) - 8
    dots = torch.einsum("mbi,nbi->mnb", xq.view(-1, nb, block).double(), q)  # exact
    s, z = (scales_zeros[..., i].double().T.repeat_interleave(group_size // block, dim=1) for i in (0, 1))  # [N, nb]
    xs = x2.float().view(-1, nb, block).sum(-1).double()
    y = (dots * d.double()[:, None, :] * s + z * xs[:, None, :]).sum(-1)
    return y.to(x.dtype).view(*shape[:-1], N)


def pack_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> object | None:
    """int8 [N, K] + scale [N] -> FBGEMM's prepacked weight for `int8_rows_linear` (two zero columns appended,
    see there); None where PyTorch has no FBGEMM (not x86). The packed copy holds the weight: drop `q` after."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    q2 = torch.cat([q, q.new_zeros(q.shape[0], 2)], dim=1)
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated; a release without them -> None
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q2, scale.double(), zeros, 0)  # a copy of q2
            del q2  # the packing's peak: q, qw and the packed copy (a 129280-row lm_head: 0.13 GB each), not four
            return torch.ops.quantized.linear_prepack(qw, None)
    except (RuntimeError, AttributeError) as e:
        log.warning("FBGEMM int8 packing unavailable (%s); the int8 lm_head stays weight-only", str(e)[:200])
        return None


@functools.cache
def activation_bits() -> int:
    """Bits of the activations in `int8_rows_linear`: 8 with VNNI's 32-bit sums, 7 without (see there)."""
    return 8 if torch.cpu._is_vnni_supported() else 7


def int8_rows_linear(x: torch.Tensor, packed: object, out_features: int) -> torch.Tensor:
    """x Wᵀ for a `pack_int8_rows` weight with 8-bit activations, per row: each row is divided by its largest
    |value| and given two extra columns, +1 and −1 (against the weight's zero columns), so that every row spans
    exactly [−1, 1]. FBGEMM's dynamic quantization (one uint8 scale per call) then gives every row the same
    quantization whatever the batch — a row's result does not depend on the rows beside it — and runs the
    product as integer dot products (VNNI): ~2.5x the one-row rate of the weight-only int8 kernel on this CPU.
    The error is the activations' 8-bit rounding, ~1e-2 of the output's norm (as llama.cpp's Q8_0 dot).
    On a CPU without VNNI, FBGEMM multiplies with AVX2's `vpmaddubsw`, whose 16-bit sums of two uint8 × int8
    products saturate (255 · 127 · 2 > 32767: wrong logits, seen on AMD Zen 3): there the activations take 7 bits
    (`reduce_range`, as PyTorch advises for such CPUs), which cannot saturate, at twice the rounding error."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    r = x2.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    ends = torch.tensor([[1.0, -1.0]]).expand(x2.shape[0], 2)
    y = torch.ops.quantized.linear_dynamic(torch.cat([x2 / r, ends], dim=1), packed, activation_bits() == 7) * r
    return y.to(x.dtype).view(*shape[:-1], out_features)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                out_features: int) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    # rows first: a compiled one-row step never reads _packed_block (a global dict: guards on every call)
    if x2.shape[0] >= DEQUANT_ROWS_INT4 and (block := _packed_block()) is not None and out_features % block == 0:
        # a GEMM: widen the weight (row chunks of whole blocks of the packed layout), then the float matmul
        dt = product_dtype(x2)  # fp32 on a CPU without native bf16 products (gemv.wide_dtype)
        return widened_gemm(x.to(dt), lambda n0, n1: dequantize_packed_int4(packed[n0:n1], scales_zeros[:, n0:n1], dt),
                            out_features, block).to(x.dtype)
    if group_size % 32 == 0 and out_features % 32 == 0 and (
            kernels.INT4_DOT if torch.compiler.is_compiling() else kernels.int_dot() and kernels.INT4_DOT):
        return torch.ops.routed.int4_dot(x, packed, scales_zeros, group_size)  # AVX2: integer dot products
    if x2.dtype != torch.bfloat16:  # the int4 CPU kernel takes bf16 activations
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16(), packed, group_size, scales_zeros)
        out = out.to(x.dtype)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_zeros)
    return out.view(*shape[:-1], out_features)
