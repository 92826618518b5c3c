"""int8 / int4 weight-only quantization: kernels equal their dequantized twins; checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import routed
from conftest import make_checkpoint
from routed.loader import write_checkpoint
from routed.quant import intq
from routed.quant.intq import (IntFormat, dequantize_int4, dequantize_int8, dequantize_packed_int4, int4_linear,
                               int8_linear, pack_int4, quantize_int4, quantize_int8)
from routed.quant.linear import QLinear, quantize_model


@pytest.mark.parametrize("rows", [5, intq.DEQUANT_ROWS_INT8])  # the int8 kernel, and dequantize + GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_dequantized_matmul(dtype: torch.dtype, rows: int) -> None:
    w, x = torch.randn(96, 64), torch.randn(rows, 64, dtype=dtype)
    q, s = quantize_int8(w)
    assert ((dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()  # half a step at most
    ref = x.float() @ dequantize_int8(q, s).T
    out = int8_linear(x, q, s).float()
    assert ((out - ref).abs().max() / ref.abs().max()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows", [5, intq.DEQUANT_ROWS_INT4])  # the int4 kernel, and unpack + GEMM
@pytest.mark.parametrize("group", [32, 64])
def test_int4_kernel_equals_dequantized_matmul(group: int, rows: int) -> None:
    w, x = torch.randn(128, 128), torch.randn(rows, 128, dtype=torch.bfloat16)
    nibbles, sz = quantize_int4(w, group)
    assert nibbles.shape == (128, 64) and sz.shape == (128 // group, 128, 2)
    assert torch.equal(dequantize_packed_int4(pack_int4(nibbles), sz, group, 128, torch.float32),
                       dequantize_int4(nibbles, sz, group))  # the kernel's layout, read back
    deq = dequantize_int4(nibbles, sz, group)
    step = (w.view(128, -1, group).amax(-1) - w.view(128, -1, group).amin(-1)) / 15
    assert ((deq - w).abs().view(128, -1, group) <= step[..., None] * 0.51 + 1e-2).all()
    ref = x.float() @ deq.T
    out = int4_linear(x, pack_int4(nibbles), sz, group, 128).float()
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-2


def test_quantized_checkpoint_round_trips_and_routes_close(tmp_path: Path) -> None:
    folder, _ = make_checkpoint(tmp_path / "src", hidden_size=64, moe_intermediate_size=64, intermediate_size=128)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = routed.load_model(folder, torch.float32, progress=False)(ids)
        for bits in (8, 4):
            in_memory = routed.load_model(folder, torch.float32, progress=False, quant=f"int{bits}")
            assert any(isinstance(m, QLinear) for m in in_memory.modules())
            expected = in_memory(ids)
            model = routed.load_model(folder, torch.float32, progress=False)
            quantize_model(model, IntFormat(bits))
            out = write_checkpoint(model, folder, tmp_path / f"int{bits}",
                                   {"quantization_config": IntFormat(bits).as_config()})
            loaded = routed.load_model(out, torch.float32, progress=False)(ids)
            assert torch.equal(loaded, expected)
            kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - loaded.log_softmax(-1))).sum(-1).mean()
            assert kl < (0.01 if bits == 8 else 0.2), (bits, float(kl))
    with pytest.raises(routed.RoutedError, match="already quantized"):
        routed.load_model(tmp_path / "int8", quant="int8", progress=False)
