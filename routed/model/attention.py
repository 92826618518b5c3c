"""MLA attention over the latent cache: the naive (reference) and absorbed paths, and a static latent cache.

Both paths take the same inputs and return the per-head attention output before `o_proj`:

    q_nope_BTHN, q_pe_BTHR   queries (rotary part already rotated)
    latent_BSC               keys: per token [c_KV (L = kv_lora_rank, normalised) | k_R (R, rotated)]
    mask_BTS                 True where query t may attend key s
    kv_b_HXL                 kv_b_proj.weight viewed [H, N + V, L]: rows :N are W_UK, rows N: are W_UV
    -> o_BTHV

Naive: expand every key and value per head through kv_b_proj (the reference, what transformers does).
Absorbed: fold W_UK into the query and W_UV after attention, so attention runs over the 576-wide latent
shared by all heads (MQA); only the latent is ever stored. Softmax is fp32 in both (the naive form's
takes bf16 scores, which PyTorch's softmax widens to fp32 and rounds once: the same result).

`paged_attention` runs an engine step whose sequences keep their latents in a paged cache. With impl "auto"
(the engine's) each sequence takes the form with fewer multiply-adds for its T queries over S keys (`use_naive`):
prefill expands its keys once and attends in query chunks, each over the keys it can see (causal), while decode
and short chunks over a long context attend in the latent (absorbed). "absorb" and "naive" force one form.

Legend: B batch rows, T query tokens, S key tokens, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim, L kv_lora_rank, C = L + R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from routed.model.gemv import gemm, product_dtype, wide_dtype

ATTN_IMPLS = ("auto", "absorb", "naive")
QUERY_CHUNK = 128  # prefill: queries per chunk of the causal (naive) form


def naive_attention(
    q_nope_BTHN: torch.Tensor,
    q_pe_BTHR: torch.Tensor,
    latent_BSC: torch.Tensor,
    mask_BTS: torch.Tensor,
    kv_b_HXL: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    k_BHSD, v_BHSV = expand_keys(latent_BSC, kv_b_HXL, q_nope_BTHN.shape[-1])
    return attend_expanded(q_nope_BTHN, q_pe_BTHR, k_BHSD, v_BHSV, mask_BTS, scale)


def expand_keys(latent_BSC: torch.Tensor, kv_b_HXL: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive form's per-head keys [k_nope | k_R] and values from the latents: -> k_BHSD, v_BHSV.

    One GEMM over all heads (token-major output), then the keys laid out head-major by the concatenation that
    builds them anyway, so each head's keys are contiguous and the attention's matmuls read them in place (from
    the token-major layout they copied the keys for every query chunk). The values stay a strided view: their
    rows are contiguous, which the matmul takes as it is."""
    H, X, L = kv_b_HXL.shape
    B, S, _ = latent_BSC.shape
    c_BSL, k_pe_BSR = latent_BSC[..., :L], latent_BSC[..., L:]
    kv_BSHX = gemm(c_BSL, kv_b_HXL.reshape(H * X, L)).view(B, S, H, X)
    k_BHSD = torch.cat([kv_BSHX[..., :N].transpose(1, 2), k_pe_BSR.unsqueeze(1).expand(-1, H, -1, -1)], dim=-1)
    return k_BHSD, kv_BSHX[..., N:].transpose(1, 2)


def attend_expanded(q_nope_BTHN: torch.Tensor, q_pe_BTHR: torch.Tensor, k_BHSD: torch.Tensor, v_BHSV: torch.Tensor,
                    mask_BTS: torch.Tensor, scale: float, masked_from: int = 0) -> torch.Tensor:
    """Softmax attention over expanded keys. Keys before `masked_from` are visible to every query (a causal
    chunk's settled prefix), so the mask is applied from there on only, in place (~4x cheaper than the
    masked_fill of the whole [H, T, S] it replaces).

    The scale goes into the queries (T rows, not T x S scores) and the scores stay in the inputs' dtype: the
    softmax of bf16 scores accumulates in fp32 and writes bf16 probabilities in one pass, where widening the
    scores to fp32, scaling, normalising and narrowing again made five (128 x 512, 16 heads: 1.8 vs 2.3 ms;
    the error against an fp32 reference the same, as the scores were already rounded to bf16 by the matmul).
    On a CPU without native bf16 products (`gemv.product_dtype`) the products and the softmax run in fp32."""
    # fp32 on a CPU without native bf16 products, or when the caller widened the keys once for all chunks
    dt = torch.promote_types(product_dtype(q_nope_BTHN, q_nope_BTHN.shape[1]), k_BHSD.dtype)
    q_BHTD = torch.cat([q_nope_BTHN, q_pe_BTHR], dim=-1).to(dt).mul_(scale).transpose(1, 2)
    scores_BHTS = torch.matmul(q_BHTD, k_BHSD.to(dt).transpose(-1, -2))
    scores_BHTS[..., masked_from:].masked_fill_(~mask_BTS[..., masked_from:].unsqueeze(1), float("-inf"))
    return torch.matmul(F.softmax(scores_BHTS, dim=-1), v_BHSV.to(dt)).transpose(1, 2).to(q_nope_BTHN.dtype)


def use_naive(T: int, S: int, kv_b_HXL: torch.Tensor, N: int) -> bool:
    """True when expanding S keys costs fewer multiply-adds than attending T queries in the latent.

    Per head, naive: S·L·(N+V) to expand + T·S·(N+R+V) to attend; absorbed: T·L·(N+V) to fold the query and
    the output + T·S·(2L+R). So naive wins iff L·(N+V)·(S−T) < T·S·(2L−N−V): always for a whole prompt (S = T,
    as 2L > N+V in every released config), never for decode (T = 1).
    """
    if T == 1:
        return False
    _, X, L = kv_b_HXL.shape
    return L * X * (S - T) < T * S * (2 * L - X)


def absorbed_attention(
    q_nope_BTHN: torch.Tensor,
    q_pe_BTHR: torch.Tensor,
    latent_BSC: torch.Tensor,
    mask_BTS: torch.Tensor,
    kv_b_HXL: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    L = kv_b_HXL.shape[-1]
    N = q_nope_BTHN.shape[-1]
    w_uk_HNL, w_uv_HVL = kv_b_HXL[:, :N], kv_b_HXL[:, N:]
    fused = torch.compiler.is_compiling() and q_nope_BTHN.shape[:2] == (1, 1)  # the compiled one-token block
    if fused:  # the weight products as multiply-sums the compiler fuses (a one-row bf16 bmm is slow on the CPU)
        q_lat_BTHL = (q_nope_BTHN.float()[..., None] * w_uk_HNL.float()).sum(-2).to(q_nope_BTHN.dtype)
    else:
        q_lat_BTHL = fold_queries(q_nope_BTHN, w_uk_HNL)
    q_BTHC = torch.cat([q_lat_BTHL, q_pe_BTHR], dim=-1)

    # the attention over the keys as two matmuls, in the compiled step too: there the keys are gathered from the
    # paged cache by their slots, and the same products as fused multiply-sums read them through that index
    # element by element (the output's sum runs across keys: strided, unvectorisable loads) — 0.96x at 16-48
    # keys and 0.74x at ~400 of the matmuls' decode speed on `small` (BENCHMARKS.md)
    o_lat_BTHL = _latent_matmuls(scale, q_BTHC, latent_BSC, L, mask_BTS)
    if fused:
        return (o_lat_BTHL.float()[..., None, :] * w_uv_HVL.float()).sum(-1).to(o_lat_BTHL.dtype)
    return unfold_outputs(o_lat_BTHL, w_uv_HVL)


def fold_queries(q_nope_BTHN: torch.Tensor, w_uk_HNL: torch.Tensor) -> torch.Tensor:
    """W_UK into the queries: -> q_lat [B, T, H, L]. On a CPU without native bf16 products in fp32 (inputs widened
    exactly, the output rounded once): oneDNN's emulated bf16 batched product took 1.85 ms for a decode batch of 8
    rows on `small` (one layer), fp32 0.19."""
    dt = _weight_product_dtype(q_nope_BTHN)
    return torch.einsum("bthn,hnl->bthl", q_nope_BTHN.to(dt), w_uk_HNL.to(dt)).to(q_nope_BTHN.dtype)


def unfold_outputs(o_lat_BTHL: torch.Tensor, w_uv_HVL: torch.Tensor) -> torch.Tensor:
    """W_UV out of the latent outputs: -> o [B, T, H, V] (in fp32 where `fold_queries` is)."""
    dt = _weight_product_dtype(o_lat_BTHL)
    return torch.einsum("bthl,hvl->bthv", o_lat_BTHL.to(dt), w_uv_HVL.to(dt)).to(o_lat_BTHL.dtype)


def _weight_product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of kv_b_proj's products with x: fp32 on a CPU without native half-precision products, whatever
    the row count (`gemv.wide_dtype`), else x's."""
    return wide_dtype(x.dtype) if x.device.type == "cpu" else x.dtype


def _latent_matmuls(scale: float, q_BTHC: torch.Tensor, latent_BSC: torch.Tensor, L: int,
                    mask_BTS: torch.Tensor) -> torch.Tensor:
    """Attention in the latent: -> the probability-weighted latents [B, T, H, L] (the values: latent[..., :L]).

    In fp32 (inputs widened exactly, output rounded once): the scores reach the softmax unrounded, and on the
    CPU the products skip oneDNN, which builds a bf16 kernel for each new shape — a decode step's context is
    one key longer than the last, so every step's two bf16 products were new shapes (1.05-1.06x decode at
    batch 1, contexts 16-48 and ~1000: BENCHMARKS.md)."""
    latent_BSC = latent_BSC.float()
    scores_BHTS = torch.einsum("bthc,bsc->bhts", q_BTHC.float(), latent_BSC) * scale
    probs_BHTS = _masked_softmax(scores_BHTS, mask_BTS)
    return torch.einsum("bhts,bsx->bthx", probs_BHTS, latent_BSC[..., :L]).to(q_BTHC.dtype)


def _masked_softmax(scores_BHTS: torch.Tensor, mask_BTS: torch.Tensor) -> torch.Tensor:
    scores_BHTS = scores_BHTS.masked_fill(~mask_BTS.unsqueeze(1), float("-inf"))
    return F.softmax(scores_BHTS, dim=-1)


ATTENTION = {"naive": naive_attention, "absorb": absorbed_attention,
             "auto": naive_attention}  # without a cache every row is a whole sequence (S = T): naive (use_naive)


@dataclass(slots=True)
class PagedBatch:
    """One engine step over a paged latent cache; tokens of all sequences are flattened into one row.

    A sequence's tokens in the step are its newest: with S = len(key_slots) and T = end - start, its token t
    sits at position S - T + t and key_slots are its positions 0..S-1 in order (the prefill attention relies
    on it: a query chunk's keys before its first query are visible to the whole chunk).

    cache_LPC     the cache, [num_layers, num_blocks * block_size, C]: slot = block * block_size + offset
    slots_N       the cache slot each token of the step writes its latent to
    seq_bounds    [start, end) of each sequence's tokens in the flattened step
    key_slots     per sequence, the slots of its first kv_len tokens (its whole context after this step)
    """

    cache_LPC: torch.Tensor
    slots_N: torch.Tensor
    seq_bounds: list[tuple[int, int]]
    key_slots: list[torch.Tensor]


def _decode_rows(batch: PagedBatch, forms: list[str], cache_PC: torch.Tensor) -> dict[int, tuple[int, int]]:
    """The absorbed sequences with one token in the step (decoding), if two or more and the cache is half precision:
    sequence index -> (its row among the absorbed rows, its token's row in the step). An fp32 cache keeps each
    sequence's own products (an fp32 request decodes the same bits alone or in a batch; tests/test_generate.py)."""
    if cache_PC.dtype == torch.float32:
        return {}
    rows, r = {}, 0
    for i, ((start, end), form) in enumerate(zip(batch.seq_bounds, forms)):
        if form == "absorb":
            if end - start == 1:
                rows[i] = (r, start)
            r += end - start
    return rows if len(rows) > 1 else {}


def _padded_keys(cache_PC: torch.Tensor, key_slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's cached latents [J, S_max, C] (padded with slot 0's) and which are its keys [J, 1, S_max]."""
    S = max(len(k) for k in key_slots)
    index = torch.zeros(len(key_slots), S, dtype=torch.long, device=cache_PC.device)
    mask = torch.zeros(len(key_slots), 1, S, dtype=torch.bool, device=cache_PC.device)
    for j, k in enumerate(key_slots):
        index[j, : len(k)], mask[j, 0, : len(k)] = k, True
    return cache_PC[index], mask


def write_latents(cache_LPC: torch.Tensor, layer: int, slots_N: torch.Tensor, latent_NC: torch.Tensor) -> None:
    """cache[layer, slots] = latents, in place. Written as index_put_ on the whole cache with a tensor index per
    dimension so that a compiled step keeps it one in-place write of its few rows (`cache[layer, slots] = ...`
    goes through a view, which the compiler functionalises into a copy of the whole cache; a custom op kept it
    in place but cost ~40 us per call from the compiled graph against ~5 us for this)."""
    cache_LPC.index_put_((torch.full_like(slots_N, layer), slots_N), latent_NC.to(cache_LPC.dtype))


def paged_attention(
    impl: str,
    layer: int,
    batch: PagedBatch,
    q_nope_BTHN: torch.Tensor,
    q_pe_BTHR: torch.Tensor,
    latent_BTC: torch.Tensor,
    positions_BT: torch.Tensor,
    kv_b_HXL: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write the step's latents into the cache, then attend per sequence over its own cached context.

    The sequences in the absorbed form share the step's two weight products: W_UK folded into all their queries
    at once and W_UV out of all their outputs at once, not once per sequence (each one-row product of a kv_b half
    costs ~0.5 ms here: 16 per layer for 8 decoding sequences). The compiled one-token step (one sequence) takes
    `absorbed_attention`, which fuses both products into its graph."""
    write_latents(batch.cache_LPC, layer, batch.slots_N, latent_BTC[0])
    cache_PC = batch.cache_LPC[layer]
    N = q_nope_BTHN.shape[-1]
    L = kv_b_HXL.shape[-1]
    out = q_nope_BTHN.new_empty(*q_nope_BTHN.shape[:3], kv_b_HXL.shape[1] - N)
    forms = [impl if impl != "auto" else ("naive" if use_naive(end - start, len(key_slots), kv_b_HXL, N) else "absorb")
             for (start, end), key_slots in zip(batch.seq_bounds, batch.key_slots)]
    shared: torch.Tensor | None = None  # the absorbed sequences' token rows, which share the weight products
    if "absorb" in forms and not torch.compiler.is_compiling():
        shared = torch.cat([torch.arange(start, end) for (start, end), form in zip(batch.seq_bounds, forms)
                            if form == "absorb"]).to(q_nope_BTHN.device)
        q_lat_BRHL = fold_queries(q_nope_BTHN.index_select(1, shared), kv_b_HXL[:, :N])
        o_lat_BRHL = q_lat_BRHL.new_empty(q_lat_BRHL.shape)
    decoding = _decode_rows(batch, forms, cache_PC) if shared is not None else {}
    if decoding:  # the one-token sequences' attention in one padded product, not ~10 eager ops per sequence
        lat_rows, step_rows = (list(r) for r in zip(*decoding.values()))
        keys_JSC, mask_JTS = _padded_keys(cache_PC, [batch.key_slots[i] for i in decoding])
        q_JTHC = torch.cat([q_lat_BRHL[0, lat_rows], q_pe_BTHR[0, step_rows]], dim=-1)
        o_lat_BRHL[0, lat_rows] = _latent_matmuls(scale, q_JTHC.unsqueeze(1), keys_JSC, L, mask_JTS)[:, 0]
    row = 0  # the next absorbed sequence's first row in q_lat / o_lat
    for i, ((start, end), key_slots, form) in enumerate(zip(batch.seq_bounds, batch.key_slots, forms)):
        if i in decoding:
            row += 1
            continue
        keys_SC = cache_PC.index_select(0, key_slots)
        S, T = keys_SC.shape[0], end - start
        key_pos_S = torch.arange(S, device=keys_SC.device)
        mask_TS = key_pos_S.unsqueeze(0) <= positions_BT[0, start:end].unsqueeze(1)
        if form == "absorb" and shared is not None:
            q_BTHC = torch.cat([q_lat_BRHL[:, row : row + T], q_pe_BTHR[:, start:end]], dim=-1)
            o_lat_BRHL[:, row : row + T] = _latent_matmuls(scale, q_BTHC, keys_SC.unsqueeze(0), L,
                                                           mask_TS.unsqueeze(0))
            row += T
            continue
        if form == "absorb":  # the compiled one-token step
            out[:, start:end] = absorbed_attention(q_nope_BTHN[:, start:end], q_pe_BTHR[:, start:end],
                                                   keys_SC.unsqueeze(0), mask_TS.unsqueeze(0), kv_b_HXL, scale)
            continue
        # naive: expand the keys once; each chunk of queries attends over the keys up to its last one (the
        # step's queries are the sequence's newest tokens, so query t sits at key position S - T + t)
        k_BHSD, v_BHSV = expand_keys(keys_SC.unsqueeze(0), kv_b_HXL, N)
        if (dt := product_dtype(q_nope_BTHN, T)) != k_BHSD.dtype:  # widened once, not per query chunk
            k_BHSD, v_BHSV = k_BHSD.to(dt), v_BHSV.to(dt)
        for a in range(0, T, QUERY_CHUNK):
            b, visible = min(a + QUERY_CHUNK, T), S - T + min(a + QUERY_CHUNK, T)
            out[:, start + a : start + b] = attend_expanded(
                q_nope_BTHN[:, start + a : start + b], q_pe_BTHR[:, start + a : start + b],
                k_BHSD[:, :, :visible], v_BHSV[:, :, :visible], mask_TS[None, a:b, :visible], scale,
                masked_from=S - T + a)  # keys before the chunk's first query are visible to all of it
    if shared is not None:
        out.index_copy_(1, shared, unfold_outputs(o_lat_BRHL, kv_b_HXL[:, N:]))
    return out
