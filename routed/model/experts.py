"""Routed-expert execution for one MoE layer: a reference loop, the grouped fast path (each chosen expert once
over its tokens) and the gathered one (each (token, expert) pair's weights read in place: compiled, for the
one-token block and for steps of a few tokens, `gather_pays`) — or, where routed's kernels are built (AVX2), the
fused one for steps of up to FUSED_MAX_TOKENS tokens (128 in bf16, 256 in int8 / int4): each chosen expert read
once for its tokens, one kernel call per layer (`RoutedExperts._fused`).

Contract: `RoutedExperts(x_ND, topk_ids_NK, topk_weights_NK, impl)` returns `(y_ND, counts_E)` where
`y[n] = Σ_k w[n,k] · Expert_{ids[n,k]}(x[n])` accumulated in fp32 and cast to x's dtype, and `counts[e]` is
the number of (token, slot) pairs routed to expert e (for telemetry).

Legend: N tokens, K experts per token, E routed experts, D hidden size, I expert intermediate size.
Weights are stacked per layer — `gate_proj_EID`, `up_proj_EID`, `down_proj_EDI` — filled at load from the
checkpoint's `mlp.experts.{e}.{gate,up,down}_proj.weight` (the loader's name table does the restacking).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from routed.malloc import huge_empty
from routed.model.gemv import PADDED_DTYPES, linear, product_dtype, realized
from routed.quant import intq, kernels
from routed.quant.intq import (IntFormat, int4_linear, int8_linear, pack_int4, quantize_int4,
                               quantize_int8)

EXPERT_IMPLS = ("grouped", "reference")
PROJS = ("gate_proj", "up_proj", "down_proj")
# A step of a few tokens reads each (token, expert) pair's weights in place through one compiled function
# (`gathered`) when its pairs are at most this many times the distinct experts they are expected to choose:
# more bytes than running each chosen expert once, but no GEMM of 2-5 rows repacking a whole expert's weight
# (~3x its bytes' time). `small`, same process: decode b8 (~1.4 pairs per distinct expert) 1.23x bf16 and 1.26x
# int8; b16 (~1.9) 0.94x.
GATHER_MAX_PAIRS_PER_EXPERT = 1.6


# Each expert's row count in the grouped products, from this on, padded to a multiple of it (oneDNN compiles and
# keeps a kernel per GEMM shape, as in `gemv.gemm`). Padded to 16, 12 prompts of 512 tokens on `small` grew the
# process by 0.08 GB instead of 0.55 (cached kernels and heap) and prefill ran 1.07-1.16x faster (fewer kernels
# built); to 8, prefill runs 1.023-1.026x faster again (1/16 of the expert rows were padding, now half that;
# benchmarks/code_ab.py, 10 rounds) for 0.285 GB of growth over 40 prompts of 16-512 tokens instead of 0.267.
EXPERT_ROWS_MULTIPLE = 8
# Steps of at most this many tokens run their experts on routed's kernels where they are built (`_fused`: each
# chosen expert read once for its tokens), per weight format (None: float). Against `_grouped`, a prompt's prefill
# on `small` in the engine (2 threads, one process, alternating): bf16 1.54x at 32 tokens, 1.25x at 128, 0.92x at
# 200; int8 1.19x and int4 1.11x at 200, 1.0x and 0.99x at 512 (BENCHMARKS.md)
FUSED_MAX_TOKENS = {None: 128, 8: 256, 4: 256}


def gather_pays(tokens: int, k: int, num_experts: int) -> bool:
    """True when `tokens` x `k` pairs are few enough against the distinct experts they choose (expected, for
    uniform routing: E (1 - (1 - k/E)^tokens)) for `gathered` to beat running each expert once."""
    distinct = num_experts * (1 - (1 - k / num_experts) ** tokens)
    return tokens * k <= GATHER_MAX_PAIRS_PER_EXPERT * distinct


def gathered(x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor,
             weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Every (token, slot) pair's expert on its own, its weights read in place by index: compiled, `w[ids]`
    becomes indexed loads inside one fused multiply-sum per projection (no copy, no host sync). `weights`:
    (gate, up, down) float [E, out, in], or int8 with their per-row scales (gate, gate_scales, up, ...)."""
    dtype = x_ND.dtype
    int8 = len(weights) == 6

    def proj(i: int, x_NK1X: torch.Tensor) -> torch.Tensor:
        if not int8:
            return (weights[i][ids_NK].float() * x_NK1X).sum(-1).to(dtype)
        q, scale = weights[2 * i][ids_NK], weights[2 * i + 1][ids_NK]
        return ((q.float() * x_NK1X).sum(-1) * scale.to(dtype).float()).to(dtype)

    x_N11D = realized(x_ND).float()[:, None, None, :]
    h_NKI = F.silu(proj(0, x_N11D)) * proj(1, x_N11D)
    y_NKD = proj(2, h_NKI.float()[:, :, None, :])
    return (y_NKD.float() * w_NK.float()[..., None]).sum(1)


class RoutedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        E, D, I = num_experts, hidden_size, intermediate_size
        self.num_experts = E
        self.logical_ids = list(range(E))  # checkpoint expert of each slot (a shard under expert parallelism)
        self.gate_proj = nn.Parameter(torch.empty(E, I, D, dtype=dtype), requires_grad=False)
        self.up_proj = nn.Parameter(torch.empty(E, I, D, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, D, I, dtype=dtype), requires_grad=False)

        self.fmt: IntFormat | None = None
        self._packed: dict[str, torch.Tensor] = {}
        self.store = None  # an ExpertStore when the experts are offloaded (routed.offload)
        self.few_tokens_fn: Callable | None = None  # compiled `gathered` for eager steps of a few tokens
        self.store_key: tuple[int, str] = (0, "")  # (layer, checkpoint name prefix) for the store

    def offload_(self, store: object, layer: int, prefix: str) -> None:
        """Drop the stacked weights; fetch each expert from `store` when a token is routed to it."""
        for name in PROJS:
            delattr(self, name)
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.store, self.store_key = store, (layer, prefix)

    def quantize_(self, fmt: IntFormat, from_weights: bool = True) -> None:
        """Replace the stacked float weights with int8/int4 buffers (`{proj}_qweight` [E, N, K] int8 or
        [E, N, K/2] int4 nibbles, `{proj}_scales` [E, N] or `{proj}_scales_zeros` [E, K/group, N, 2]);
        empty when not from_weights (a quantized checkpoint is about to be loaded into them)."""
        for name in PROJS:
            w = getattr(self, name)
            E, N, K = w.shape
            delattr(self, name)
            if fmt.bits == 8:
                pairs = [quantize_int8(w[e]) for e in range(E)] if from_weights else None
                q = torch.stack([p[0] for p in pairs]) if pairs else torch.empty(E, N, K, dtype=torch.int8)
                s = torch.stack([p[1] for p in pairs]) if pairs else torch.empty(E, N, dtype=torch.float32)
                self.register_buffer(f"{name}_qweight", q)
                self.register_buffer(f"{name}_scales", s)
            else:
                pairs = [quantize_int4(w[e], fmt.group_size) for e in range(E)] if from_weights else None
                q = torch.stack([p[0] for p in pairs]) if pairs else torch.empty(E, N, K // 2, dtype=torch.uint8)
                s = (torch.stack([p[1] for p in pairs]) if pairs
                     else torch.empty(E, K // fmt.group_size, N, 2, dtype=torch.bfloat16))
                self.register_buffer(f"{name}_qweight", q)
                self.register_buffer(f"{name}_scales_zeros", s)
        self.fmt = fmt

    def finalize_(self) -> None:
        """Float: gate and up laid out as the two halves of one [E, 2I, D] tensor (`gate_proj`, `up_proj` views of
        it), which the grouped products take as one weight (`_gate_up`). int4: pack every expert's weights for the
        CPU kernel and drop the unpacked copies — gate and up as one [2I, D] weight per expert (one kernel call
        for both: a one-token step's six experts 239 vs 290 us per layer on `small`), its scales and zeros
        concatenated the same way."""
        if self.fmt is None:
            if self.store is None and self.gate_proj.numel() and self._gate_up() is None:
                (E, I, D), gate, up = self.gate_proj.shape, self.gate_proj.detach(), self.up_proj.detach()
                gate_up = huge_empty((E, 2 * I, D), gate.dtype) if gate.device.type == "cpu" else None
                gate_up = torch.cat([gate, up], dim=1, out=gate_up)
                self.gate_proj = nn.Parameter(gate_up[:, :I], requires_grad=False)
                self.up_proj = nn.Parameter(gate_up[:, I:], requires_grad=False)
            return
        if self.fmt.bits != 4:
            return
        gate, up, down = self.gate_proj_qweight, self.up_proj_qweight, self.down_proj_qweight
        (E, I, half_D), half_I = gate.shape, down.shape[2]
        # packed into their final tensors expert by expert: no list of packed copies beside them (the load's peak)
        gate_up_packed = self._packed["gate_up_proj"] = huge_empty((E, 2 * I, half_D), torch.uint8)
        down_packed = self._packed["down_proj"] = huge_empty((E, down.shape[1], half_I), torch.uint8)
        for e in range(E):
            gate_up_packed[e] = pack_int4(torch.cat([gate[e], up[e]]))
            down_packed[e] = pack_int4(down[e])
        self._packed["gate_up_proj_scales_zeros"] = torch.cat([self.gate_proj_scales_zeros,
                                                               self.up_proj_scales_zeros], dim=2)
        for name in PROJS:
            setattr(self, f"{name}_qweight", torch.empty(0, dtype=torch.uint8))
        for name in ("gate_proj", "up_proj"):
            setattr(self, f"{name}_scales_zeros", torch.empty(0, dtype=torch.bfloat16))

    def _gate_up(self) -> torch.Tensor | None:
        """gate_proj and up_proj as one [E, 2I, D] weight, when they are its two halves (`finalize_`)."""
        g, u = self.gate_proj, self.up_proj
        if g.dim() != 3 or u.shape != g.shape or u.dtype != g.dtype:
            return None
        E, I, D = g.shape
        layout = (2 * I * D, D, 1)
        if g.stride() != layout or u.stride() != layout or u.data_ptr() != g.data_ptr() + I * D * g.element_size():
            return None
        return g.as_strided((E, 2 * I, D), layout)

    def _proj(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.store is not None:
            weights = self.store.get(self.store_key[0], e, self.store_key[1])
            return linear(x, weights[PROJS.index(name)])
        if self.fmt is None:
            return linear(x, getattr(self, name)[e])
        if self.fmt.bits == 8:
            return int8_linear(x, getattr(self, f"{name}_qweight")[e], getattr(self, f"{name}_scales")[e])
        merged = name == "gate_up_proj"  # its scales are held with the packed weights, not as a buffer
        sz = self._packed[f"{name}_scales_zeros"][e] if merged else getattr(self, f"{name}_scales_zeros")[e]
        return int4_linear(x, self._packed[name][e], sz, self.fmt.group_size, sz.shape[1])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if "gate_up_proj" in self._packed:  # int4: gate and up in one product
            gate, up = self._proj("gate_up_proj", e, x).chunk(2, dim=-1)
        else:
            gate, up = self._proj("gate_proj", e, x), self._proj("up_proj", e, x)
        return self._proj("down_proj", e, F.silu(gate) * up)

    def forward(
        self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor, impl: str = "grouped",
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() and self.store is None:  # the one-token block (compile_decode)
            counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=x_ND.device).index_add_(
                0, topk_ids_NK.flatten(), torch.ones_like(topk_ids_NK.flatten()))
            if self.fused:
                y = self._fused(x_ND, topk_ids_NK, topk_weights_NK)
            elif self.gathers:
                y = self._gathered(x_ND, topk_ids_NK, topk_weights_NK)
            else:  # PyTorch's int kernels: each id read as a size
                y = self._reference(x_ND, topk_ids_NK, topk_weights_NK)
            return y.to(out_dtype or x_ND.dtype), counts_E
        counts_E = torch.bincount(topk_ids_NK.flatten(), minlength=self.num_experts)
        N, K = topk_ids_NK.shape
        # few_tokens_fn: set for resident float and int8 experts by Transformer._compile_few_tokens
        if impl == "grouped" and self.fused and N <= FUSED_MAX_TOKENS[self.fmt.bits if self.fmt else None]:
            y = self._fused(x_ND, topk_ids_NK, topk_weights_NK)
        elif impl == "grouped" and self.few_tokens_fn is not None and N >= 2 and gather_pays(N, K, self.num_experts):
            y = self._gathered(x_ND, topk_ids_NK, topk_weights_NK)
        elif impl == "grouped":
            y = self._grouped(x_ND, topk_ids_NK, topk_weights_NK, counts_E)
        elif impl == "reference":
            y = self._reference(x_ND, topk_ids_NK, topk_weights_NK)
        else:
            raise ValueError(f"unknown expert impl {impl!r}; choose from {EXPERT_IMPLS}")
        return y.to(out_dtype or x_ND.dtype), counts_E

    def _reference(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Slow twin: every (token, slot) pair on its own."""
        out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        for n in range(x_ND.shape[0]):
            for k in range(ids_NK.shape[1]):
                e = int(ids_NK[n, k])
                out[n] += self.expert(e, x_ND[n : n + 1])[0].float() * w_NK[n, k].float()
        return out

    @property
    def gathers(self) -> bool:
        """Resident float weights, or int8 ones where the compiled step fuses int8 products (`intq.FUSED_INT8_LOADS`;
        elsewhere `gathered`'s int8 loads run at a fraction of the bandwidth), unless `fused`: what `gathered` reads
        in place. The others run each chosen expert on its own (`_reference`), int4 and int8 through their
        kernels."""
        return not self.fused and self.store is None and (
            self.fmt is None or (self.fmt.bits == 8 and intq.FUSED_INT8_LOADS))

    @property
    def fused(self) -> bool:
        """Resident bf16, int8 or int4 experts where routed's kernels are built (AVX2): `_fused` runs them."""
        if self.store is not None:
            return False
        if self.fmt is None:
            D, I = self.down_proj.shape[1:]
            return (kernels.BF16_DOT and self.down_proj.dtype == torch.bfloat16
                    and all(getattr(self, name).stride()[1:] == ((D, 1) if name != "down_proj" else (I, 1))
                            for name in PROJS))
        if self.fmt.bits == 8:
            D, I = self.down_proj_qweight.shape[1:]
            return kernels.INT8_DOT and D % 32 == 0 and I % 32 == 0
        return (kernels.INT4_DOT and "gate_up_proj" in self._packed and self.fmt.group_size % 32 == 0
                and self.down_proj_scales_zeros.shape[2] % 32 == 0 and self._packed["down_proj"].shape[2] % 16 == 0)

    def _fused(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """The chosen experts read in place by routed's kernels, each once for the tokens that chose it, one call
        per layer (`routed::bf16_experts` / `int8_experts` / `int4_experts`: the experts' gate and up rows in one
        parallel pass, then their down rows; each token's products as `bf16_dot` / `int8_dot` / `int4_dot`
        computes them alone) -> fp32 [N, D], as `_reference`."""
        if self.fmt is None:
            return torch.ops.routed.bf16_experts(x_ND, ids_NK, w_NK, *self._gathered_weights())
        if self.fmt.bits == 8:
            return torch.ops.routed.int8_experts(x_ND, ids_NK, w_NK, *self._gathered_weights())
        p = self._packed
        return torch.ops.routed.int4_experts(x_ND, ids_NK, w_NK, p["gate_up_proj"], p["gate_up_proj_scales_zeros"],
                                             p["down_proj"], self.down_proj_scales_zeros, self.fmt.group_size)

    def _gathered_weights(self) -> tuple[torch.Tensor, ...]:
        if self.fmt is None:
            return tuple(getattr(self, name) for name in PROJS)
        return tuple(t for name in PROJS for t in (getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scales")))

    def _gathered(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """`gathered` over this layer's float or int8 weights: inside the compiled one-token block, or through
        `few_tokens_fn` (the model's compiled `gathered`) for eager steps of a few tokens."""
        if torch.compiler.is_compiling() or self.few_tokens_fn is None:
            return gathered(x_ND, ids_NK, w_NK, self._gathered_weights())
        x_ND, ids_NK, w_NK = (t.contiguous() for t in (x_ND, ids_NK, w_NK))  # one layout: no guard fails on it
        for t in (x_ND, ids_NK, w_NK):  # any number of tokens: one graph (compiled at load, `compile_decode`)
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return self.few_tokens_fn(x_ND, ids_NK, w_NK, self._gathered_weights())

    def _grouped(
        self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """Sort the (token, slot) pairs by expert and run each chosen expert once on all of its tokens; add the
        weighted outputs into the fp32 sum in that sorted order (each token's terms in expert order).

        Float weights on the CPU: all experts in two `F.grouped_mm` calls over the sorted rows, gate and up as one
        weight (`finalize_`; three calls before it runs). The loop over experts runs in C++ (per expert the Python
        loop below costs ~10 dispatches, ~0.1 ms — 448 experts per 512-token prefill on `small`); bf16/fp16
        experts' rows are padded with zeros to a multiple of EXPERT_ROWS_MULTIPLE, as `gemv.gemm` pads. Quantized
        or offloaded experts, and float ones on a CPU without native bf16 products: that loop, one expert at a
        time (each expert's products in `gemv.product_dtype`)."""
        K = ids_NK.shape[1]
        order = ids_NK.flatten().argsort(stable=True)
        token_of = order // K
        w_sorted = w_NK.flatten()[order].float().unsqueeze(-1)
        # CUDA's grouped_mm takes bf16 on sm90 only; a CPU without native bf16 products runs them in fp32, one
        # expert at a time below (all experts widened to fp32 at once would be 4x their bytes)
        if (self.fmt is None and self.store is None and x_ND.device.type == "cpu"
                and product_dtype(x_ND) == x_ND.dtype):
            m = EXPERT_ROWS_MULTIPLE  # per expert (a decode step's 1-7 rows stay as they are), as `gemv.gemm` pads
            padded_E = (torch.where(counts_E < m, counts_E, (counts_E + m - 1) // m * m) if x_ND.dtype in PADDED_DTYPES
                        else counts_E)
            offs = padded_E.cumsum(0)
            rows, (N, D) = int(offs[-1]), x_ND.shape
            src, w_rows = token_of, w_sorted  # per product row: the token it reads and adds into, its weight
            out = torch.zeros(N + (rows > len(order)), D, dtype=torch.float32, device=x_ND.device)
            if rows > len(order):  # padding rows read a zero row appended to x, add (weighted 0) into row N of out
                shift_E = (offs - padded_E) - (counts_E.cumsum(0) - counts_E)  # padded start - start, per expert
                row = torch.arange(len(order)) + shift_E.repeat_interleave(counts_E, output_size=len(order))
                src = torch.full((rows,), N, dtype=token_of.dtype).index_copy_(0, row, token_of)
                w_rows = w_sorted.new_zeros(rows, 1).index_copy_(0, row, w_sorted)
                x_ND = torch.cat([x_ND, x_ND.new_zeros(1, D)])
            x_rows = x_ND.index_select(0, src)  # row copies (x[idx] copies element by element)
            offs = offs.to(torch.int32)

            def proj(name: str, x: torch.Tensor) -> torch.Tensor:  # weights [E, out, in] -> per expert x @ w.T
                return F.grouped_mm(x, getattr(self, name).transpose(1, 2), offs=offs)

            if (gate_up := self._gate_up()) is not None:  # one product for both: 2I columns (gate, then up)
                gu = F.grouped_mm(x_rows, gate_up.transpose(1, 2), offs=offs)
                h = F.silu(gu[:, : gu.shape[1] // 2]).mul_(gu[:, gu.shape[1] // 2 :])
            else:
                h = F.silu(proj("gate_proj", x_rows)).mul_(proj("up_proj", x_rows))
            # the fp32 product float(y)·w that `y * w_rows` promotes to, as one cast and an in-place product:
            # a mixed-dtype product runs ~2x slower on the CPU; a padding row's y is 0 (its x is), its weight 0
            return out.index_add_(0, src, proj("down_proj", h).float().mul_(w_rows))[:N]
        out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        start = 0
        for e, count in enumerate(counts_E.tolist()):
            if count == 0:
                continue
            end = start + count
            tokens = token_of[start:end]
            y = self.expert(e, x_ND.index_select(0, tokens))
            out.index_add_(0, tokens, y * w_sorted[start:end])
            start = end
        return out
