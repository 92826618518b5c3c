"""int8 / int4 weight-only quantization: kernels equal their dequantized twins; checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import routed
from conftest import make_checkpoint
from routed.loader import write_checkpoint
from routed.model import gemv
from routed.quant import intq, kernels
from routed.quant.intq import (IntFormat, dequantize_int4, dequantize_int8, dequantize_packed_int4, int4_linear,
                               int8_linear, int8_rows_linear, pack_int4, pack_int8_rows, quantize_int4, quantize_int8)
from routed.quant.linear import QLinear, finalize_model, quantize_model

FBGEMM = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no FBGEMM here")


@pytest.mark.parametrize("rows", [5, intq.DEQUANT_ROWS_INT8])  # the int8 kernel, and dequantize + GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_dequantized_matmul(dtype: torch.dtype, rows: int, half_products: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's weight-only kernel (routed's own `int8_dot`, where it runs, in tests/test_int_dot.py)."""
    monkeypatch.setattr(kernels, "int_dot", lambda: False)
    w, x = torch.randn(96, 64), torch.randn(rows, 64, dtype=dtype)
    q, s = quantize_int8(w)
    assert ((dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()  # half a step at most
    ref = x.float() @ dequantize_int8(q, s).T
    out = int8_linear(x, q, s).float()
    assert ((out - ref).abs().max() / ref.abs().max()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("in_features", [136, 40])
def test_int8_weights_the_kernel_cannot_take_run_widened(in_features: int) -> None:
    """`_weight_int8pack_mm` needs in_features % 16 == 0 (else garbage or a crash): int8_linear widens those."""
    w, x = torch.randn(64, in_features), torch.randn(3, in_features, dtype=torch.bfloat16)
    q, s = quantize_int8(w)
    ref = x.float() @ dequantize_int8(q, s).T
    out = int8_linear(x, q, s).float()
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-2

@FBGEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_kernel_is_the_dequantized_matmul_to_8_bit_activations_and_batch_invariant(dtype) -> None:
    w, x = torch.randn(200, 96), torch.randn(6, 96, dtype=dtype)
    x[2] *= 1000  # rows of very different scales are each quantized on their own
    x[4, 7] = 50  # an outlier column
    q, s = quantize_int8(w)
    packed = pack_int8_rows(q, s)
    ref = x.float() @ dequantize_int8(q, s).T
    out = int8_rows_linear(x, packed, 200)
    assert out.dtype == dtype and out.shape == (6, 200)
    # 8-bit activations: each row rounded to steps of 2·max|x|/255, so |error| <= max|x|/255 · Σ_k |W[n, k]|
    # (7-bit on a CPU without VNNI, whose 16-bit sums would saturate: steps of 2·max|x|/127)
    levels = 2 ** intq.activation_bits() - 1
    bound = x.float().abs().amax(1, keepdim=True) / levels * dequantize_int8(q, s).abs().sum(1)
    bound = bound * 1.001 + (ref.abs() / 128 if dtype == torch.bfloat16 else 1e-5)  # + the output's rounding
    assert ((out.float() - ref).abs() <= bound).all()
    assert ((out.float() - ref).abs() > 1e-4 * ref.abs().amax()).any()  # and it is quantized, not exact
    alone = torch.cat([int8_rows_linear(x[i : i + 1], packed, 200) for i in range(6)])
    assert torch.equal(out, alone)  # a row's result does not depend on the rows beside it
    assert torch.equal(int8_rows_linear(x[1:4], packed, 200), out[1:4])


@FBGEMM
def test_int8_lm_head_runs_on_packed_rows_and_falls_back_to_weight_only(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "int_dot", lambda: False)  # as where routed's own kernel does not run
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(64, 320, bias=False)
    quantize_model(model, IntFormat(8))
    q, s = model.lm_head.qweight.clone(), model.lm_head.scales
    x = torch.randn(3, 64)
    finalize_model(model)
    assert model.lm_head._rows is not None and model.lm_head.qweight.numel() == 0
    assert model.lm_head._rows_bytes == 320 * 66  # counted as weight bytes (the packed copy replaces qweight)
    assert torch.equal(model.lm_head(x), int8_rows_linear(x, model.lm_head._rows, 320))
    monkeypatch.setattr("routed.quant.linear.pack_int8_rows", lambda q, s: None)  # no FBGEMM: weight-only
    fallback = torch.nn.Module()
    fallback.lm_head = QLinear(64, 320, IntFormat(8))
    fallback.lm_head.qweight, fallback.lm_head.scales = q, s
    finalize_model(fallback)
    assert fallback.lm_head._rows is None and torch.equal(fallback.lm_head(x), int8_linear(x, q, s))


@pytest.mark.parametrize("rows", [5, intq.DEQUANT_ROWS_INT4])  # the int4 kernel, and unpack + GEMM
@pytest.mark.parametrize("group", [32, 64])
def test_int4_kernel_equals_dequantized_matmul(group: int, rows: int, half_products: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's int4 kernel (routed's own `int4_dot`, where it runs, in tests/test_int_dot.py)."""
    monkeypatch.setattr(kernels, "int_dot", lambda: False)
    w, x = torch.randn(128, 128), torch.randn(rows, 128, dtype=torch.bfloat16)
    nibbles, sz = quantize_int4(w, group)
    assert nibbles.shape == (128, 64) and sz.shape == (128 // group, 128, 2)
    assert torch.equal(dequantize_packed_int4(pack_int4(nibbles), sz, torch.float32),
                       dequantize_int4(nibbles, sz, group))  # the kernel's layout, read back
    deq = dequantize_int4(nibbles, sz, group)
    step = (w.view(128, -1, group).amax(-1) - w.view(128, -1, group).amin(-1)) / 15
    assert ((deq - w).abs().view(128, -1, group) <= step[..., None] * 0.51 + 1e-2).all()
    ref = x.float() @ deq.T
    out = int4_linear(x, pack_int4(nibbles), sz, group, 128).float()
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-2


def test_int4_packing_in_row_chunks_equals_packing_at_once() -> None:
    """pack_int4 packs in row chunks (a large lm_head never widens to int32 whole): same bytes, read back exact."""
    w = torch.randn(640, 256)
    nibbles, sz = quantize_int4(w, 32)
    at_once = pack_int4(nibbles, rows_per_chunk=640)
    assert torch.equal(pack_int4(nibbles, rows_per_chunk=128), at_once)  # 5 chunks
    assert torch.equal(pack_int4(nibbles, rows_per_chunk=256), at_once)  # the last chunk short
    assert torch.equal(dequantize_packed_int4(at_once, sz, torch.float32), dequantize_int4(nibbles, sz, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_widened_by_the_compiled_kernel_equals_the_stored_nibbles(dtype: torch.dtype,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """widen_int4 (a prefill's int4 weight as float, compiled by inductor after enable_widen) gives the dequantized
    Wᵀ bitwise, as its eager twin does, for weights and row chunks of several shapes (one graph per group size)."""
    monkeypatch.setitem(intq._WIDEN, "kernel", None)  # this test's compile stays in this test
    g = torch.Generator().manual_seed(3)
    nibbles, sz = quantize_int4(torch.randn(256, 192, generator=g), 32)
    packed = pack_int4(nibbles)
    want = dequantize_int4(nibbles, sz, 32).t().to(dtype)  # [K, N]
    nibbles64, sz64 = quantize_int4(torch.randn(192, 256, generator=g), 64)
    packed64, want64 = pack_int4(nibbles64), dequantize_int4(nibbles64, sz64, 64).t().to(dtype)
    assert torch.equal(intq.widen_int4(packed, sz, dtype), want)  # eager
    assert intq.enable_widen(dtype, 32)
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):  # as the engine calls it
        assert torch.equal(intq.widen_int4(packed, sz, dtype), want)
        assert torch.equal(intq.widen_int4(packed[:128], sz[:, :128], dtype), want[:, :128])  # a row chunk
        assert torch.equal(intq.widen_int4(packed[128:], sz[:, 128:], dtype), want[:, 128:])
    with torch.inference_mode():  # another group size: a graph of its own
        assert torch.equal(intq.widen_int4(packed64, sz64, dtype), want64)


def test_weights_widened_for_a_gemm_in_row_chunks_give_the_whole_product(monkeypatch: pytest.MonkeyPatch,
                                                                         half_products: bool) -> None:
    """int8 and int4 GEMMs widen their weight in even row chunks of at most ~DEQUANT_CHUNK weights (int4: whole
    blocks of the packed layout, the last chunk short): the same result as widening it whole."""
    w, x = torch.randn(448, 128), torch.randn(intq.DEQUANT_ROWS_INT4, 128, dtype=torch.bfloat16)
    nibbles, sz = quantize_int4(w, 32)
    packed = pack_int4(nibbles)
    q, s = quantize_int8(w)
    whole4, whole8 = int4_linear(x, packed, sz, 32, 448), int8_linear(x, q, s)
    calls = []
    gemm = gemv.gemm
    monkeypatch.setattr(gemv, "gemm", lambda a, b: calls.append(b.shape[0]) or gemm(a, b))
    monkeypatch.setattr(gemv, "DEQUANT_CHUNK", 128 * 128)
    assert torch.equal(int4_linear(x, packed, sz, 32, 448), whole4)
    assert calls == [128, 128, 128, 64]  # the packed layout's blocks are 16-128 rows: 128 is whole blocks
    calls.clear()
    assert torch.equal(int8_linear(x, q, s), whole8)
    assert calls == [112, 112, 112, 112]  # even chunks of at most 128 rows


@pytest.mark.parametrize("rows", [3, intq.DEQUANT_ROWS_INT4])  # the int4 kernel, and dequantize + GEMM
def test_int4_merged_gate_up_equals_dequantized_swiglu(rows: int) -> None:
    """At load, an int4 SwiGLU's gate and up (routed experts, dense and shared MLPs) become one packed weight;
    each must still compute down(silu(gate x) * up x) with its own dequantized weights."""
    from routed.model.deepseek_v3 import MLP
    from routed.model.experts import RoutedExperts

    g = torch.Generator().manual_seed(rows)
    holder = torch.nn.Module()
    holder.mlp, holder.experts = MLP(128, 96, torch.float32), RoutedExperts(4, 128, 64, torch.float32)
    for w in holder.parameters():
        w.data.copy_(torch.randn(w.shape, generator=g) * 0.1)
    fmt = IntFormat(4, 32)
    quantize_model(holder, fmt)
    deq = {name: dequantize_int4(q.qweight, q.scales_zeros, 32) for name, q in holder.mlp.named_children()}
    ex = holder.experts
    deq_e = {p: [dequantize_int4(getattr(ex, f"{p}_qweight")[e], getattr(ex, f"{p}_scales_zeros")[e], 32)
                 for e in range(4)] for p in ("gate_proj", "up_proj", "down_proj")}
    finalize_model(holder)
    assert hasattr(holder.mlp, "gate_up_proj") and not hasattr(holder.mlp, "gate_proj")
    x = torch.randn(rows, 128, generator=g)
    xb = x.bfloat16().float()  # the int4 kernel takes bf16 activations

    def swiglu(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.silu(v @ gate.T) * (v @ up.T)).bfloat16().float() @ down.T

    ref = swiglu(deq["gate_proj"], deq["up_proj"], deq["down_proj"], xb)
    with torch.no_grad():
        torch.testing.assert_close(holder.mlp(x), ref, rtol=0, atol=2e-2 * ref.abs().max().item())
        for e in range(4):
            ref = swiglu(deq_e["gate_proj"][e], deq_e["up_proj"][e], deq_e["down_proj"][e], xb)
            torch.testing.assert_close(ex.expert(e, x), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


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
