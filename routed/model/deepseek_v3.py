"""The DeepSeek-V3 architecture, top to bottom, in the order a token travels.

    embed -> [Block: RMSNorm -> MLA -> + ; RMSNorm -> dense SwiGLU or MoE -> +] x num_hidden_layers
          -> RMSNorm -> lm_head                           (+ optional MTP modules after the last layer)

Parameter names equal the Hugging Face checkpoint's (`model.layers.3.self_attn.kv_b_proj.weight`, ...), except
two restructurings the loader applies as data: routed experts are stacked per layer
(`mlp.experts.gate_proj` [E, I, D]) and MTP modules live in `mtp.{k}` rather than `model.layers.{N+k}`.

Precision: RoPE tables are computed in fp32 from the config on every call (never from a buffer that a
`.to(bfloat16)` could round); the router weight and correction bias stay fp32 whatever the module dtype;
RMSNorm statistics, router math, softmax and expert accumulation run in fp32.

Shapes: B batch rows, T tokens, D hidden, H heads, V vocab, E routed experts, K experts per token.
"""

from __future__ import annotations

import logging
import math
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from routed.config import ModelConfig, RopeConfig
from routed.model import native
from routed.model.attention import ATTENTION, ATTN_IMPLS, PagedBatch, paged_attention
from routed.model.experts import RoutedExperts, gathered
from routed.model.gemv import Linear
from routed.progress import progress_bar
from routed.quant import intq

log = logging.getLogger(__name__)


# ---- norms and rotary embedding -----------------------------------------------------------------
class RMSNorm(nn.Module):
    """g ⊙ x / sqrt(mean(x²) + eps): statistic in fp32, result cast back, then scaled (as transformers)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Per-pair angular rates f'_i (fp32, [dim/2]); YaRN blends extrapolated and interpolated rates."""
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated = 1.0 / base
    if rope.rope_type != "yarn":
        return extrapolated
    interpolated = 1.0 / (rope.factor * base)

    def correction_dim(rotations: float) -> float:
        L0 = rope.original_max_position_embeddings
        return dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (high-frequency) rate, 0: divide by factor
    return interpolated * (1 - keep) + extrapolated * keep


class RotaryEmbedding:
    """cos/sin for integer positions, in fp32. A plain object, not a module: nothing for `.to()` to round."""

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        self.inv_freq = rope_inv_freq(rope, dim)
        self.factor = rope.cos_sin_factor

    def __call__(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions_BT.float().unsqueeze(-1) * self.inv_freq.to(positions_BT.device)
        return angles.cos() * self.factor, angles.sin() * self.factor


def apply_rope(x: torch.Tensor, cos_BTP: torch.Tensor, sin_BTP: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... — the checkpoints' interleaved layout — in fp32.

    x is [B, T, R] or [B, T, H, R]; the output keeps the interleaved layout.
    """
    if x.dim() == 4:
        cos_BTP, sin_BTP = cos_BTP.unsqueeze(2), sin_BTP.unsqueeze(2)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack([x1 * cos_BTP - x2 * sin_BTP, x2 * cos_BTP + x1 * sin_BTP], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _linear(d_in: int, d_out: int, dtype: torch.dtype) -> nn.Linear:
    layer = Linear(d_in, d_out, bias=False, dtype=dtype)
    layer.weight.requires_grad_(False)
    return layer


# ---- attention ------------------------------------------------------------------------------------
class MLA(nn.Module):
    """Multi-head latent attention: projections here, the attention itself in attention.py."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.q_proj = _linear(D, H * cfg.qk_head_dim, dtype)
        else:
            self.q_a_proj = _linear(D, cfg.q_lora_rank, dtype)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = _linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype)
        self.kv_a_proj_with_mqa = _linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = _linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype)
        self.o_proj = _linear(H * cfg.v_head_dim, D, dtype)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions_BT: torch.Tensor,
        batch: PagedBatch | None,
        layer: int,
        impl: str,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHQ = q.view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q_BTHQ[..., : self.nope_dim], apply_rope(q_BTHQ[..., self.nope_dim :], *rope)

        kv = self.kv_a_proj_with_mqa(x_BTD)
        c_BTL = self.kv_a_layernorm(kv[..., : self.kv_lora_rank])
        k_pe_BTR = apply_rope(kv[..., self.kv_lora_rank :], *rope)
        latent_BTC = torch.cat([c_BTL, k_pe_BTR], dim=-1)

        kv_b_HXL = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        if batch is None:  # every row is its own sequence, all tokens present: causal over positions
            mask_BTS = positions_BT.unsqueeze(1) <= positions_BT.unsqueeze(2)
            o_BTHV = ATTENTION[impl](q_nope, q_pe, latent_BTC, mask_BTS, kv_b_HXL, self.scale)
        else:
            o_BTHV = paged_attention(impl, layer, batch, q_nope, q_pe, latent_BTC, positions_BT, kv_b_HXL,
                                     self.scale)
        return self.o_proj(o_BTHV.reshape(B, T, -1))


# ---- feed-forward -----------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU: dense layers below first_k_dense_replace, and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = _linear(hidden_size, intermediate_size, dtype)
        self.up_proj = _linear(hidden_size, intermediate_size, dtype)
        self.down_proj = _linear(intermediate_size, hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # int4: gate and up merged at load (`quant.linear.merge_int4_gate_up_`)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """The router, in fp32: scores, group-limited top-k on the biased scores, weights from unbiased scores.

    sigmoid/noaux_tc (V3): select on s + bias, groups scored by the sum of their top-2, dropped groups −inf.
    softmax/greedy or group_limited_greedy (V2): select on s, groups scored by their max.
    Weights are s at the chosen experts, renormalised when norm_topk_prob, always × routed_scaling_factor.

    Routing telemetry: while `counting` is on, every forward adds into device buffers (no host sync) —
    `expert_counts` [E] tokens per expert, `expert_weight` [E] summed routing weight, `route_stats` [4] =
    (tokens, Σ margin between the k-th choice and the best allowed alternative on the biased score, Σ top-k
    share of the score mass, tokens with non-finite scores). `routed.telemetry` reads and resets them once
    per engine step (and may rebind them to rows of one stacked buffer).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E = cfg.n_routed_experts
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        if cfg.has_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        limited = cfg.topk_method != "greedy" and cfg.n_group > 1
        self.candidates = cfg.topk_group * (E // cfg.n_group) if limited else E  # experts a token may pick
        self.counting = True
        self.register_buffer("expert_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("expert_weight", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.register_buffer("route_stats", torch.zeros(4, dtype=torch.float32), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """Follow device moves but never a dtype cast: router math and the bias stay fp32 (spec trap 1)."""

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if out.dtype != t.dtype and t.is_floating_point() else out

        return super()._apply(keep_fp32, recurse)

    def reset_counters(self) -> None:
        for buf in (self.expert_counts, self.expert_weight, self.route_stats):
            buf.zero_()

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> topk_ids [N, K], topk_weights [N, K] fp32, router logits [N, E] fp32."""
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores = logits_NE.sigmoid() if self.scoring_func == "sigmoid" else logits_NE.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        masked = choice
        if self.topk_method != "greedy" and self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.max(dim=-1).values
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            masked = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(N, E)
        E, K = scores.shape[1], self.top_k
        top = masked.topk(min(K + 1, self.candidates), dim=-1)  # one extra for the gate margin (telemetry)
        topk_ids = top.indices[:, :K]
        raw = scores.gather(1, topk_ids)
        weights = raw / (raw.sum(dim=-1, keepdim=True) + 1e-20) if self.norm_topk_prob else raw
        weights = weights * self.scaling
        if self.counting:
            self._count(scores, top.values, topk_ids, raw, weights)
        return topk_ids, weights, logits_NE

    @torch.no_grad()
    def _count(self, scores_NE: torch.Tensor, top_NK1: torch.Tensor, topk_ids_NK: torch.Tensor,
               raw_NK: torch.Tensor, weights_NK: torch.Tensor) -> None:
        """A handful of small in-place ops, one reduction: counts, weights, margin, mass, non-finite tokens."""
        flat = topk_ids_NK.flatten()
        self.expert_counts.index_add_(0, flat, torch.ones_like(flat))
        self.expert_weight.index_add_(0, flat, weights_NK.flatten())
        K = topk_ids_NK.shape[1]
        mass_N = raw_NK.sum(-1) / scores_NE.sum(-1)  # NaN for a token whose scores are not finite
        margin_N = top_NK1[:, K - 1] - top_NK1[:, K] if top_NK1.shape[1] > K else torch.zeros_like(mass_N)
        per_token = torch.stack([torch.ones_like(mass_N), margin_N, mass_N, mass_N.isnan().float()], dim=1)
        self.route_stats += per_token.nansum(0)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype)
            if cfg.n_shared_experts
            else None
        )
        self.expert_impl = "grouped"
        self.ep = None  # routed.parallel.ep.ExpertParallel when the experts are sharded over ranks

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        topk_ids, topk_weights, _ = self.gate(x_ND)
        if self.ep is not None:  # this rank's experts, summed over ranks
            y_ND = self.ep.forward(self.experts, x_ND, topk_ids, topk_weights, self.expert_impl)
        else:
            y_ND, _ = self.experts(x_ND, topk_ids, topk_weights, self.expert_impl)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return y_ND.view_as(x_BTD)


# ---- blocks -----------------------------------------------------------------------------------------
def _run_blocks(blocks: tuple[Block, ...], h_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                positions_BT: torch.Tensor, batch: PagedBatch | None, first: int, impl: str) -> torch.Tensor:
    """Consecutive decoder blocks from layer `first` on; what `Transformer.compile_decode` compiles."""
    for j, block in enumerate(blocks):
        h_BTD = block(h_BTD, rope, positions_BT, batch, first + j, impl)
    return h_BTD


# The compiled one-token step: consecutive blocks, at most this many per compiled call. Every call costs ~0.3-0.5
# ms besides its kernels (guards, the generated wrapper) — per block, ~15% of a bf16 `small` step — while each
# distinct run of block kinds is one more graph to compile (~3 s per block, cold).
DECODE_CHUNK = 8
# Guards a compiled decode call checks: those on its arguments (the step's tensors and sizes, the attention
# impl), on the modules' tensors and plain attributes (dtypes, shapes, `Gate.counting`, hooks), and the global
# state (grad mode, ...). Not the hundreds that re-check what a loaded model cannot change: module classes and
# dict layouts, the identity of globals (functions, modules, constants) — ~70% of them, ~0.1 ms per call.
_STATE_GUARDS = frozenset({"GRAD_MODE", "GLOBAL_STATE", "DETERMINISTIC_ALGORITHMS", "TORCH_FUNCTION_STATE",
                           "DEFAULT_DEVICE", "AUTOGRAD_SAVED_TENSORS_HOOKS", "SHAPE_ENV"})
_LAYOUT_GUARDS = frozenset({"TYPE_MATCH", "ID_MATCH", "CLASS_MATCH", "NOT_PRESENT_IN_GENERIC_DICT",
                            "DICT_KEYS_MATCH", "DICT_CONTAINS", "DICT_NOT_CONTAINS", "HASATTR", "SEQUENCE_LENGTH",
                            "DUPLICATE_INPUT"})


def own_copy(fn: Callable, name: str) -> Callable:
    """`fn` as a new function whose code object is its own (named `name`): dynamo keeps compiled graphs per code
    object, so each model compiles its own copy (see `Transformer.compiled_blocks_fn`)."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


def _decode_guards(entries: list) -> list[bool]:
    return [e.guard_type in _STATE_GUARDS or not (
        e.is_global or (e.orig_guard.source.is_unspecialized_nn_module() and e.guard_type in _LAYOUT_GUARDS))
        for e in entries]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MoE(cfg, dtype) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size, dtype)
        )

    def forward(
        self,
        h_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions_BT: torch.Tensor,
        batch: PagedBatch | None,
        layer: int,
        impl: str,
    ) -> torch.Tensor:
        h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), rope, positions_BT, batch, layer, impl)
        return h_BTD + self.mlp(self.post_attention_layernorm(h_BTD))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class MTPLayer(Block):
    """Multi-token prediction module k: a full block fed [enorm(emb(t_{i+1})) ; hnorm(h_i)] through eh_proj.

    The checkpoint's duplicate `embed_tokens` and `shared_head.head` are not loaded: the main model's
    embedding and lm_head are used (they are copies in every released checkpoint).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__(cfg, layer_idx, dtype)
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.eh_proj = _linear(2 * D, D, dtype)
        self.shared_head = SharedHead(cfg, dtype)

    def forward(  # type: ignore[override]
        self,
        h_BTD: torch.Tensor,
        emb_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions_BT: torch.Tensor,
        batch: PagedBatch | None,
        layer: int,
        impl: str,
    ) -> torch.Tensor:
        """h_i (incoming hidden) and Emb(t_{i+1}) -> shared_head.norm(Block(eh_proj([enorm(e) ; hnorm(h)]))).

        Embedding first, hidden second (the released weights' column order, spec §5.2). The result is both
        what the head reads and what a next MTP depth (or draft step) takes as its incoming hidden.
        """
        x_BTD = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))
        return self.shared_head.norm(super().forward(x_BTD, rope, positions_BT, batch, layer, impl))


class DecoderStack(nn.Module):
    """The `model.` prefix of the checkpoint: embedding, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class Transformer(nn.Module):
    """DeepSeek-V3-family causal LM. `model(input_ids_BT)` -> fp32 logits [B, T, V] (no cache)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, with_mtp: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg, dtype)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, dtype)
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k, dtype) for k in range(n_mtp))
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
        self.attn_impl = "auto"
        self._decode_fns: dict[tuple[type, ...], Callable] = {}  # compile_decode(): per run of block kinds
        self._one_token_plan: list[tuple[Callable, int, tuple[Block, ...]]] | None = None  # (fn, first, blocks)
        self._native = None  # compile_decode(): the native one-token step (routed.model.native.NativeStep)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def gates(self) -> list[tuple[int, Gate]]:
        """(layer index, router) of every MoE layer of the main model, in order."""
        return [(i, layer.mlp.gate) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)]

    def set_impl(self, attn: str | None = None, experts: str | None = None) -> None:
        """Choose the attention path (auto | absorb | naive) and the expert path (grouped | reference)."""
        if attn is not None:
            if attn not in ATTN_IMPLS:
                raise ValueError(f"unknown attention impl {attn!r}; choose from {ATTN_IMPLS}")
            self.attn_impl = attn
        if experts is not None:
            for module in self.modules():
                if isinstance(module, MoE):
                    module.expert_impl = experts

    def forward_hidden(
        self,
        input_ids_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        batch: PagedBatch | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, D].

        Without a batch every row is one whole sequence (causal attention over its positions). With a
        PagedBatch (B = 1: the step's tokens of all sequences flattened) each token's latent is written to
        its cache slot and each sequence attends over its own cached context.
        """
        B, T = input_ids_BT.shape
        if self._native_step(input_ids_BT, batch):
            return self._native.hidden(input_ids_BT, positions_BT, batch)
        if positions_BT is None:
            positions_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        rope = self.rotary(positions_BT)
        h = self.model.embed_tokens(input_ids_BT)
        # a context of one key (a one-token prompt's first step) stays eager: the compiled step's key count is
        # symbolic from 2 (1 is specialised on: it would compile a second graph while serving, ~25 s cold)
        if (self._one_token_plan is not None and T == 1 and batch is not None and not torch.is_grad_enabled()
                and len(batch.key_slots[0]) > 1):
            for run, first, blocks in self._one_token_plan:
                h = run(blocks, h, rope, positions_BT, batch, first, self.attn_impl)
        else:
            h = _run_blocks(tuple(self.model.layers), h, rope, positions_BT, batch, 0, self.attn_impl)
        return self.model.norm(h)

    def _native_step(self, input_ids_BT: torch.Tensor, batch: PagedBatch | None) -> bool:
        """Whether this step is one token of one sequence that the native model runs (`compile_decode`)."""
        return (self._native is not None and input_ids_BT.numel() == 1 and batch is not None
                and not torch.is_grad_enabled() and self.attn_impl != "naive")

    def decode_logits(self, input_ids_BT: torch.Tensor, positions_BT: torch.Tensor, batch: PagedBatch
                      ) -> torch.Tensor | None:
        """The logits [1, V] (fp32) of a one-token step, embedding to lm_head in one native call — or None where
        the native step does not take it (the caller runs `forward_hidden` and `logits`)."""
        if not self._native_step(input_ids_BT, batch) or not self._native.has_head:
            return None
        return self._native.logits(input_ids_BT, positions_BT, batch)

    def compile_decode(self, progress: bool = False, allow_native: bool = True) -> bool:
        """Compile the decoder for one-token steps (decode at batch 1); True if it is in use.

        Where every block can run as routed's native `DecodeLayer` (`routed.model.native`: bf16 activations, routed's
        kernels on an AVX2 CPU), that is the one-token step instead and nothing is compiled (`allow_native=False`:
        compile the graph below regardless, as benchmarks comparing the two do).

        One-token steps are memory-bound GEMVs plus ~350 small ops per layer, most of them per-op overhead in
        eager PyTorch. Compiled (inductor), a block is a few fused loops: the one-row products
        as multiply-sums (`gemv.linear`), the chosen experts' weights read in place (`RoutedExperts._gathered`),
        norms, RoPE, router and softmax fused around them. A compiled call runs DECODE_CHUNK consecutive blocks
        (the compiler unrolls them and takes their weights as inputs), so a step is a few calls: `small`'s 8
        layers one, DeepSeek-V3's 61 eight. Each run of block kinds (dense, MoE) has its own compiled function
        with the guards of `_decode_guards`, whose graph every chunk of those kinds shares (V3: 3 dense + 5 MoE
        blocks, then six chunks of 8 MoE blocks with one graph, then the last 5).

        Compiled here, by one step on a scratch cache whose sizes that change between steps — the context's keys,
        the cache's slots — are marked symbolic, so no later step compiles; every other size (the weights') is a
        constant of the graph, not an input read on each call (with all sizes symbolic, ~110 per call: int8
        decode 1.09x, int4 1.05x, bf16 1.00x, benchmarks/decode_sizes_ab.py): ~35 s for
        `small` the first time on a machine, ~2 s from inductor's on-disk cache. Called again (the engine does,
        after it sets routing telemetry on or off), it runs the same warm-up, which compiles only what the new
        settings need. If compiling fails it warns and stays eager. Multi-token steps (prefill, batches) stay
        eager.
        """
        if allow_native and (step := native.build(self)) is not None:
            self._native, self._one_token_plan = step, None  # (its experts are fused: nothing gathers)
            return True
        self._native = None
        layers = list(self.model.layers)
        try:
            # int4 (and AVX2's int8) experts: each chosen id is read as a size (`int(id)`) and selects a view of its
            # weights for the kernel
            torch._dynamo.config.capture_scalar_outputs = True
            # the softmax scale is a constant of the model: baked in, not a symbolic float
            torch._dynamo.config.specialize_float = True
            # no guards that two sizes stay equal because they were at the warm-up (keys = layers, say)
            torch.fx.experimental._config.use_duck_shape = False
            # a process may hold several models (tests, benchmarks), each with a few entries per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            plan: list[tuple[Callable, int, tuple[Block, ...]]] = []
            for first in range(0, len(layers), DECODE_CHUNK):
                blocks = tuple(layers[first : first + DECODE_CHUNK])
                # each run of block kinds (dense, MoE, in order) its own function: the guards do not check
                # module classes (`_decode_guards`), so a graph must only ever see the kinds it traced
                kinds = tuple(type(block.mlp) for block in blocks)
                if kinds not in self._decode_fns:
                    self._decode_fns[kinds] = self.compiled_blocks_fn(f"_run_blocks_{len(self._decode_fns)}")
                plan.append((self._decode_fns[kinds], first, blocks))
            keys = 3  # keys of the warm-up step: a size that is neither 0 nor 1 (those would be specialised on)
            cache = self.new_cache(keys + 1)  # made as the engine makes its cache (outside inference mode)
            with torch.inference_mode(), progress_bar("compiling the decode step", total=len(plan),
                                                      enabled=progress) as advance:
                # the step's own tensors made in inference mode, as the engine's runner makes them
                batch = PagedBatch(cache, torch.tensor([keys - 1]), [(0, 1)], [torch.arange(keys)])
                torch._dynamo.mark_dynamic(cache, 1)  # the engine's cache: its slots
                torch._dynamo.mark_dynamic(batch.key_slots[0], 0)  # the context: one key more each step
                positions = torch.tensor([[keys - 1]])
                h = self.model.embed_tokens(torch.tensor([[0]]))
                rope = self.rotary(positions)
                for fn, first, blocks in plan:
                    h = fn(blocks, h, rope, positions, batch, first, self.attn_impl)
                    advance()
                self._compile_few_tokens()
        except Exception as e:  # noqa: BLE001 — no compiler, or inductor refuses: the eager path is correct
            log.warning("compiled one-token decode unavailable (%s); staying eager", str(e).splitlines()[0][:200])
            self._one_token_plan = None
            return False
        finally:
            for module in self.modules():
                if isinstance(module, Gate):
                    module.reset_counters()
        self._one_token_plan = plan
        return True

    def _compile_few_tokens(self) -> None:
        """Eager steps of a few tokens (batched decode, MTP verification) run their float or int8 experts through
        one compiled `experts.gathered` per model when that pays (`experts.gather_pays`); compiled here by one
        warm-up call of 2 tokens, their count symbolic. Once per model; if it fails, the grouped path stays."""
        experts = [m for m in self.modules() if isinstance(m, RoutedExperts) and m.gathers]
        if not experts or experts[0].few_tokens_fn is not None:
            return
        moe = next(layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE))
        fn = torch.compile(own_copy(gathered, f"_gathered_{id(self):x}"), dynamic=None)
        try:
            x = torch.randn(2, self.config.hidden_size, dtype=self.dtype)
            ids, weights, _ = moe.gate(x)  # the dtypes the engine's steps bring
            for m in experts:
                m.few_tokens_fn = fn
            moe.experts._gathered(x, ids, weights)
        except Exception as e:  # noqa: BLE001 — the grouped path is correct
            log.warning("compiled few-token experts unavailable (%s); grouped", str(e).splitlines()[0][:200])
            for m in experts:
                m.few_tokens_fn = None

    def compiled_blocks_fn(self, name: str) -> Callable:
        """`_run_blocks` compiled for this model's one-token steps: a copy of its own (code object `name` + this
        model's id), the guards of `_decode_guards`; `compile_decode` marks which sizes are symbolic.

        Its own copy because dynamo keeps compiled graphs per code object and tries a call's guards against each
        of them in turn: sharing one would make every call walk the others' graphs first (small: bf16 decode 58.6
        -> 48.2 tok/s once int8 and int4 were compiled in the same process). int4 weights run through PyTorch's
        int4 kernel, ~130 calls per token on `small` (gate and up merged) between the fused loops: launched from
        inductor's C++ wrapper instead of its generated Python, 1.05x the int4 decode speed for a ~55 s longer
        first compile; int8 weights through PyTorch's int8 kernel (on AVX2, `intq.FUSED_INT8_LOADS`) 1.07x (`small`,
        the two alternating in one process: 31.0 vs 28.1 tok/s). The fused loops of float and int8 weights gain ~1%
        from it, so they keep the Python wrapper."""
        own = own_copy(_run_blocks, f"{name}_{id(self):x}")
        bits = {fmt.bits for m in self.model.layers.modules() if (fmt := getattr(m, "fmt", None)) is not None}
        kernels = 4 in bits or (8 in bits and not intq.FUSED_INT8_LOADS)
        return torch.compile(own, dynamic=None, options={"guard_filter_fn": _decode_guards, "cpp_wrapper": kernels})

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_BTD).float()

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.logits(self.forward_hidden(input_ids_BT))

    def new_cache(self, num_slots: int) -> torch.Tensor:
        """An empty paged latent cache: [layers (+ MTP layers), num_slots, kv_lora_rank + qk_rope_head_dim]."""
        cfg = self.config
        return torch.zeros(cfg.num_hidden_layers + len(self.mtp), num_slots, cfg.latent_dim, dtype=self.dtype,
                           device=self.model.embed_tokens.weight.device)

    def forward_mtp(
        self,
        hidden_BTD: torch.Tensor,
        next_ids_BT: torch.Tensor,
        k: int = 0,
        positions_BT: torch.Tensor | None = None,
        batch: PagedBatch | None = None,
    ) -> torch.Tensor:
        """MTP module k: hidden states [B, T, D] whose logits (`self.logits`) predict the token after next_ids.

        `hidden_BTD` is the main model's post-final-norm hidden (k = 0) or the previous module's output;
        `next_ids_BT` holds t_{i+k+1} at row position i (the caller shifts; an inference caller may zero the
        embedding at position 0 itself). With a PagedBatch the module's latents use cache layer
        num_hidden_layers + k.
        """
        B, T = next_ids_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(T, device=next_ids_BT.device).expand(B, T)
        rope = self.rotary(positions_BT)
        emb_BTD = self.model.embed_tokens(next_ids_BT)
        return self.mtp[k](hidden_BTD, emb_BTD, rope, positions_BT, batch, self.config.num_hidden_layers + k,
                           self.attn_impl)
