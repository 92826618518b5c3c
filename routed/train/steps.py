"""One training step and one evaluation pass over the same model code the engine runs.

Losses for a batch of windows w [B, T+1] (inputs w[:, :T], next tokens w[:, 1:]):

* main: cross-entropy of the LM head on the post-final-norm hidden h, averaged over B·T tokens;
* MTP (spec §5.2–5.3): depth k = 1..D combines h^{k−1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}, for the
  T − k positions whose target is inside the window; `L_MTP = λ/D · Σ_k CE_k` (h⁰ = h);
* balance (spec §4.5): α · Σ over router calls (every MoE layer, MTP included) of the sequence-wise loss;
* total = main + L_MTP + balance. Then clip the gradient norm, AdamW, and move each router's correction
  bias by γ toward balance from the step's expert counts (spec §4.4).

`model` holds fp32 master weights; `autocast_dtype` bfloat16 runs the matmuls in bf16 (routers stay fp32).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from routed.model.deepseek_v3 import Gate, Transformer
from routed.telemetry.measures import max_vio
from routed.train.balance import RouterTap, read_and_reset_counts, update_bias


@dataclass(slots=True)
class Losses:
    total: torch.Tensor
    main: torch.Tensor
    mtp: torch.Tensor  # λ-free mean over depths (0 when there are no MTP modules)
    balance: torch.Tensor  # α-free sum over router calls (0 when not recorded)


@dataclass(slots=True)
class StepStats:
    loss: float
    main: float
    mtp: float
    balance: float
    grad_norm: float
    lr: float
    max_vio: float  # mean over main-model MoE layers of this step's MaxVio
    max_vio_layers: list[float]
    seconds: float
    tokens: int


@dataclass(slots=True)
class EvalStats:
    loss: float
    mtp: float
    max_vio: float  # mean over layers of MaxVio over the whole validation set
    max_vio_layers: list[float]
    tokens: int


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def compute_losses(model: Transformer, windows_BW: torch.Tensor, mtp_lambda: float, alpha: float,
                   tap: RouterTap | None, with_mtp: bool = True) -> Losses:
    """The losses of one batch of windows; `with_mtp=False` skips the MTP modules (then mtp = 0)."""
    x_BT, y_BT = windows_BW[:, :-1], windows_BW[:, 1:]
    B, T = x_BT.shape
    h_BTD = model.forward_hidden(x_BT)
    main = F.cross_entropy(model.logits(h_BTD).flatten(0, 1), y_BT.flatten())
    depth = len(model.mtp)
    mtp = torch.zeros((), dtype=torch.float32)
    h_prev = h_BTD
    for k in range(depth if with_mtp else 0):
        n = T - k - 1  # positions whose target t_{i+k+2} is inside the window
        if n < 1:
            break
        h_k = model.forward_mtp(h_prev[:, :n], windows_BW[:, k + 1: k + 1 + n], k)
        mtp = mtp + F.cross_entropy(model.logits(h_k).flatten(0, 1), windows_BW[:, k + 2: k + 2 + n].flatten())
        h_prev = h_k
    mtp = mtp / max(depth, 1)
    balance = tap.balance_loss(B) if tap is not None and alpha > 0 else torch.zeros((), dtype=torch.float32)
    total = main + mtp_lambda * mtp + alpha * balance
    return Losses(total, main, mtp, balance)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps to `peak`, then cosine down to `peak · min_ratio` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main_gate_count(model: Transformer) -> int:
    return len(model.gates())


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, windows_BW: torch.Tensor, *, lr: float,
               mtp_lambda: float, alpha: float, gamma: float, grad_clip: float, tap: RouterTap,
               gates: list[Gate], amp_dtype: torch.dtype | None) -> StepStats:
    """Forward, backward, clip, AdamW, bias update; returns the step's figures."""
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr
    for g in gates:
        g.reset_counters()
    tap.recording = alpha > 0
    try:
        with autocast(amp_dtype):
            losses = compute_losses(model, windows_BW, mtp_lambda, alpha, tap, with_mtp=mtp_lambda > 0)
        losses.total.backward()
    finally:
        tap.recording = False
        tap.clear()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    counts_LE = read_and_reset_counts(gates)
    for g, c in zip(gates, counts_LE):
        if g.e_score_correction_bias is not None:
            update_bias(g.e_score_correction_bias, c, gamma)
    n_main = main_gate_count(model)
    mv = max_vio(counts_LE[:n_main]) if n_main else torch.zeros(0)
    return StepStats(
        loss=losses.total.item(), main=losses.main.item(), mtp=losses.mtp.item(), balance=losses.balance.item(),
        grad_norm=float(grad_norm), lr=lr, max_vio=float(mv.mean()) if n_main else 0.0,
        max_vio_layers=[round(float(v), 4) for v in mv], seconds=time.perf_counter() - t0,
        tokens=windows_BW.shape[0] * (windows_BW.shape[1] - 1),
    )


@torch.no_grad()
def evaluate(model: Transformer, windows_NW: torch.Tensor, batch: int, gates: list[Gate],
             amp_dtype: torch.dtype | None) -> EvalStats:
    """Mean main and MTP loss over fixed validation windows; MaxVio of the expert counts over all of them."""
    model.eval()
    for g in gates:
        g.reset_counters()
    main_sum = mtp_sum = 0.0
    n_rows = windows_NW.shape[0]
    try:
        for start in range(0, n_rows, batch):
            chunk = windows_NW[start: start + batch]
            with autocast(amp_dtype):
                losses = compute_losses(model, chunk, 1.0, 0.0, None, with_mtp=True)
            main_sum += float(losses.main) * chunk.shape[0]
            mtp_sum += float(losses.mtp) * chunk.shape[0]
    finally:
        model.train()
    counts_LE = read_and_reset_counts(gates)
    n_main = main_gate_count(model)
    mv = max_vio(counts_LE[:n_main]) if n_main else torch.zeros(0)
    return EvalStats(loss=main_sum / n_rows, mtp=mtp_sum / n_rows, max_vio=float(mv.mean()) if n_main else 0.0,
                     max_vio_layers=[round(float(v), 4) for v in mv], tokens=n_rows * (windows_NW.shape[1] - 1))
