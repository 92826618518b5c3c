"""The compiled one-row bf16 GEMV equals its eager twin, and a bf16 decode step through it matches eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from routed.model import gemv
from routed.loader import load_model


@pytest.mark.parametrize("n,k", [(64, 128), (384, 1024), (129, 33)])
def test_gemv_equals_eager_linear(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(1, 1, k, generator=g).bfloat16()
    assert gemv.enable()  # compiled (a compile failure would leave it off)
    with torch.inference_mode():
        assert gemv.takes_gemv(x, w)
        got = gemv.linear(x, w)
    exact = x.double() @ w.double().T
    assert got.shape == (1, 1, n) and got.dtype == torch.bfloat16
    # one bf16 rounding of an fp32-accumulated sum: at least as close to the exact product as eager bf16
    err, eager_err = (got.double() - exact).abs().max(), (F.linear(x, w).double() - exact).abs().max()
    assert err <= max(eager_err, exact.abs().max() * 2**-8)


def test_other_inputs_stay_on_f_linear() -> None:
    assert gemv.enable()
    w = torch.randn(8, 16).bfloat16()
    assert not gemv.takes_gemv(torch.randn(2, 16).bfloat16(), w)  # two rows: a GEMM
    assert not gemv.takes_gemv(torch.randn(1, 16), w.float())  # fp32
    with torch.enable_grad():
        assert not gemv.takes_gemv(torch.randn(1, 16).bfloat16(), w)  # training


def test_decode_step_matches_eager(tiny_preset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(tiny_preset, "bf16", progress=False)
    assert gemv.enable()
    ids = torch.tensor([[1000]])
    with torch.inference_mode():
        fast = model(ids)[0, -1]
        monkeypatch.setitem(gemv._state, "kernel", None)
        eager = model(ids)[0, -1]
    torch.testing.assert_close(fast, eager, rtol=0.02, atol=0.02 * float(eager.abs().max()))
    assert fast.argmax() == eager.argmax()
