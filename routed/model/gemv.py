"""One-row bf16 products on the CPU (decode at batch 1): a compiled multiply-sum instead of eager GEMV.

PyTorch's eager bf16 matrix-vector product reads weights at ~10 GB/s on this CPU (one thread), while the same
product written as `(w.float() * x.float()).sum(-1)` and compiled by inductor into one fused, vectorised loop
reads them at ~19 GB/s (benchmarks/gemv.py, BENCHMARKS.md). `linear(x, w)` takes that path for a single row
of bf16 activations and weights on the CPU outside autograd, and `F.linear` otherwise — so prefill, batches,
fp32, quantized weights, GPUs and training are unchanged. The kernel is compiled once (dynamic shapes,
~3 s) on first use; if compiling fails (no C compiler), it warns once and stays on F.linear.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
_state: dict[str, object] = {"kernel": None, "disabled": False}


def _gemv(x_K: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    return (w_NK.float() * x_K.float()).sum(-1).to(x_K.dtype)


def _kernel():  # noqa: ANN202
    if _state["kernel"] is None:
        _state["kernel"] = torch.compile(_gemv, dynamic=True)
    return _state["kernel"]


def takes_gemv(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() == w.shape[-1] and w.dim() == 2 and not _state["disabled"] and not torch.is_grad_enabled())


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), through the compiled GEMV when x is one bf16 row on the CPU."""
    if bias is None and takes_gemv(x, w):
        try:
            return _kernel()(x.reshape(-1), w.detach()).view(*x.shape[:-1], w.shape[0])
        except Exception as e:  # noqa: BLE001 — no compiler, or inductor refuses: the eager path is correct
            _state["disabled"] = True
            log.warning("compiled bf16 GEMV unavailable (%s); using F.linear", str(e).splitlines()[0][:200])
    return F.linear(x, w, bias)


class Linear(nn.Linear):
    """nn.Linear whose one-row bf16 CPU products take the compiled GEMV (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
