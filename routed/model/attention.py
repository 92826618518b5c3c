"""MLA attention over the latent cache: the naive (reference) and absorbed paths, and a static latent cache.

Both paths take the same inputs and return the per-head attention output before `o_proj`:

    q_nope_BTHN, q_pe_BTHR   queries (rotary part already rotated)
    latent_BSC               keys: per token [c_KV (L = kv_lora_rank, normalised) | k_R (R, rotated)]
    mask_BTS                 True where query t may attend key s
    kv_b_HXL                 kv_b_proj.weight viewed [H, N + V, L]: rows :N are W_UK, rows N: are W_UV
    -> o_BTHV

Naive: expand every key and value per head through kv_b_proj (the reference, what transformers does).
Absorbed: fold W_UK into the query and W_UV after attention, so attention runs over the 576-wide latent
shared by all heads (MQA); only the latent is ever stored. Softmax is fp32 in both.

Legend: B batch rows, T query tokens, S key tokens, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim, L kv_lora_rank, C = L + R.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("absorb", "naive")


def naive_attention(
    q_nope_BTHN: torch.Tensor,
    q_pe_BTHR: torch.Tensor,
    latent_BSC: torch.Tensor,
    mask_BTS: torch.Tensor,
    kv_b_HXL: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    H, X, L = kv_b_HXL.shape
    N = q_nope_BTHN.shape[-1]
    c_BSL, k_pe_BSR = latent_BSC[..., :L], latent_BSC[..., L:]
    kv_BSHX = torch.einsum("bsl,hxl->bshx", c_BSL, kv_b_HXL)
    k_nope_BSHN, v_BSHV = kv_BSHX[..., :N], kv_BSHX[..., N:]
    k_BHSD = torch.cat([k_nope_BSHN, k_pe_BSR.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1).transpose(1, 2)
    q_BHTD = torch.cat([q_nope_BTHN, q_pe_BTHR], dim=-1).transpose(1, 2)
    scores_BHTS = torch.matmul(q_BHTD, k_BHSD.transpose(-1, -2)).float() * scale
    probs_BHTS = _masked_softmax(scores_BHTS, mask_BTS).to(v_BSHV.dtype)
    return torch.matmul(probs_BHTS, v_BSHV.transpose(1, 2)).transpose(1, 2)


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
    q_lat_BTHL = torch.einsum("bthn,hnl->bthl", q_nope_BTHN, w_uk_HNL)
    q_BTHC = torch.cat([q_lat_BTHL, q_pe_BTHR], dim=-1)
    scores_BHTS = torch.einsum("bthc,bsc->bhts", q_BTHC, latent_BSC).float() * scale
    probs_BHTS = _masked_softmax(scores_BHTS, mask_BTS).to(latent_BSC.dtype)
    o_lat_BTHL = torch.einsum("bhts,bsl->bthl", probs_BHTS, latent_BSC[..., :L])
    return torch.einsum("bthl,hvl->bthv", o_lat_BTHL, w_uv_HVL)


def _masked_softmax(scores_BHTS: torch.Tensor, mask_BTS: torch.Tensor) -> torch.Tensor:
    scores_BHTS = scores_BHTS.masked_fill(~mask_BTS.unsqueeze(1), float("-inf"))
    return F.softmax(scores_BHTS, dim=-1)


ATTENTION = {"naive": naive_attention, "absorb": absorbed_attention}


class LatentCache:
    """Contiguous per-row latent cache for a static batch: `data[layer, row, position] = [c_KV | k_R]`.

    Rows fill from position 0 upwards; a forward writes its tokens at their positions, then attends over the
    first `kv_len` positions with a causal mask on positions, so padding written past a row's end is masked
    out and later overwritten. (The engine's paged cache replaces this for continuous batching.)
    """

    def __init__(
        self, num_layers: int, batch: int, max_len: int, latent_dim: int, dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.data = torch.zeros(num_layers, batch, max_len, latent_dim, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, positions_BT: torch.Tensor, latent_BTC: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Store this step's latents at their positions; return the first kv_len positions of every row."""
        rows_B1 = torch.arange(positions_BT.shape[0], device=positions_BT.device).unsqueeze(1)
        self.data[layer][rows_B1, positions_BT] = latent_BTC.to(self.data.dtype)
        return self.data[layer, :, :kv_len]
