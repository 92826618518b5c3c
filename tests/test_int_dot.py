"""routed's integer dot-product kernels (`torch.ops.routed.int8_dot` / `int4_dot`, AVX2 CPUs without AVX-512):
equal to their slow twins (`intq.int8_dot_reference` / `int4_dot_reference`: 8-bit activations per block of 32,
exact integer dots), within the activations' rounding of the float product, batch-invariant, the same compiled,
and what int8/int4 products (the int8 lm_head too) run on where they are built."""

from __future__ import annotations

import pytest
import torch

from routed.quant import intq, kernels
from routed.quant.intq import (IntFormat, dequantize_int4, dequantize_int8, int4_dot_reference, int4_linear,
                               int8_dot_reference, int8_linear, pack_int4, quantize_int4, quantize_int8)
from routed.quant.linear import finalize_model, quantize_model

pytestmark = pytest.mark.skipif(not kernels.int_dot(), reason="routed's int8 kernel runs on AVX2 CPUs only")


def _case(rows: int, K: int, N: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(rows * 1000 + K + N)
    w, x = torch.randn(N, K), torch.randn(rows, K, dtype=dtype)
    if rows > 2:
        x[1] *= 1000  # rows of very different scales: each block quantized on its own
        x[2, 5] = 60  # an outlier
        x[0, :32] = 0  # an all-zero block
    q, s = quantize_int8(w)
    return x, q, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,K,N", [(1, 1024, 512), (5, 96, 100), (1, 64, 1), (31, 160, 37), (3, 2816, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_dot_equals_its_twin(dtype: torch.dtype, rows: int, K: int, N: int, scale_dtype: torch.dtype) -> None:
    x, q, s = _case(rows, K, N, dtype)
    s = s.to(scale_dtype)
    out = torch.ops.routed.int8_dot(x, q, s)
    twin = int8_dot_reference(x, q, s)
    assert out.dtype == dtype and out.shape == (rows, N)
    # the same integers; only the fp32 order of the blocks' sums differs (and one rounding to bf16)
    tol = (2**-7 if dtype == torch.bfloat16 else 1e-5) * twin.float().abs() + 1e-5 * twin.float().abs().amax()
    assert ((out.float() - twin.float()).abs() <= tol).all()
    # and the twin is the float product up to the activations' rounding: half a step per activation
    xq, d = intq.quantize_activations_q8(x.reshape(-1, K))
    deq = dequantize_int8(q, s.float())
    ref = x.float() @ deq.T
    steps = d.repeat_interleave(32, dim=1)  # [rows, K]: each activation's step
    bound = (steps / 2) @ deq.abs().T * 1.001 + (ref.abs() / 128 if dtype == torch.bfloat16 else 1e-4)
    assert ((twin.float() - ref).abs() <= bound).all()
    assert ((twin.float() - ref).abs() > 1e-6 * ref.abs().amax()).any()  # it is quantized, not exact


def test_int8_dot_is_batch_invariant_and_takes_leading_dims() -> None:
    x, q, s = _case(6, 256, 300, torch.bfloat16)
    out = torch.ops.routed.int8_dot(x, q, s)
    assert torch.equal(out, torch.cat([torch.ops.routed.int8_dot(x[i : i + 1], q, s) for i in range(6)]))
    assert torch.equal(torch.ops.routed.int8_dot(x.view(2, 3, 256), q, s), out.view(2, 3, 300))
    assert torch.ops.routed.int8_dot(x[:0], q, s).shape == (0, 300)


def test_int8_dot_rejects_what_it_cannot_take() -> None:
    x, q, s = _case(1, 96, 8, torch.float32)
    for bad, match in [((x[:, :64], q, s), "features"), ((x, q[:, :80].contiguous(), s), "multiple of 32"),
                       ((x, q.float(), s), "int8"), ((x, q, s[:4]), "scale"), ((x.half(), q, s), "fp32 or bf16")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.routed.int8_dot(*bad)


def test_int8_dot_compiled_equals_eager() -> None:
    x, q, s = _case(1, 512, 256, torch.bfloat16)
    compiled = torch.compile(lambda x: int8_linear(x, q, s), dynamic=False)
    assert torch.equal(compiled(x), torch.ops.routed.int8_dot(x, q, s))


def test_int8_products_and_lm_head_run_on_it() -> None:
    x, q, s = _case(5, 128, 64, torch.bfloat16)
    assert torch.equal(int8_linear(x, q, s), torch.ops.routed.int8_dot(x, q, s))  # a few rows
    x32 = torch.randn(intq.DEQUANT_ROWS_INT8, 128, dtype=torch.bfloat16)  # a GEMM: widened, float products
    assert torch.allclose(int8_linear(x32, q, s).float(), x32.float() @ dequantize_int8(q, s).T, rtol=2e-2, atol=2e-2)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(64, 320, bias=False)
    quantize_model(model, IntFormat(8))
    finalize_model(model, torch.bfloat16)
    head = model.lm_head
    assert head._rows is None and head.qweight.shape == (320, 64)  # not FBGEMM's 7-bit rows: this kernel
    h = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(head(h), torch.ops.routed.int8_dot(h, head.qweight, head.scales))


def test_without_a_compiler_it_warns_once_and_products_stay_on_pytorchs(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    import torch.utils.cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Error building extension 'routed_int_dot'\ng++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "INT8_DOT", False)
    kernels.int_dot.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not kernels.int_dot() and not kernels.int_dot()
        assert [r.getMessage() for r in caplog.records] == [
            "routed's int8/int4 kernels could not be built (g++: command not found); int8 and int4 products stay on "
            "PyTorch's kernels"]
        x, q, s = _case(3, 64, 16, torch.float32)
        torch.testing.assert_close(int8_linear(x, q, s), torch.ops.aten._weight_int8pack_mm(x, q, s))
        nibbles, sz = quantize_int4(torch.randn(32, 64), 32)
        packed = pack_int4(nibbles)
        torch.testing.assert_close(int4_linear(x.bfloat16(), packed, sz, 32, 32),
                                   torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz))
    finally:
        kernels.int_dot.cache_clear()
    monkeypatch.undo()
    assert kernels.int_dot() and kernels.INT8_DOT  # loaded again from the extension cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,K,N,group", [(1, 1024, 512, 32), (5, 128, 96, 64), (1, 64, 32, 32), (33, 96, 64, 32),
                                           (3, 2816, 64, 128)])
def test_int4_dot_equals_its_twin(dtype: torch.dtype, rows: int, K: int, N: int, group: int) -> None:
    x, _, _ = _case(rows, K, 8, dtype)
    w = torch.randn(N, K) + torch.linspace(-2, 2, K)  # groups off centre: the zeros matter
    nibbles, sz = quantize_int4(w, group)
    packed = pack_int4(nibbles)
    out = torch.ops.routed.int4_dot(x, packed, sz, group)
    twin = int4_dot_reference(x, nibbles, sz, group)
    assert out.dtype == dtype and out.shape == (rows, N)
    tol = (2**-7 if dtype == torch.bfloat16 else 1e-5) * twin.float().abs() + 1e-5 * twin.float().abs().amax()
    assert ((out.float() - twin.float()).abs() <= tol).all()
    # the twin is the float product of the int4 weights up to the activations' rounding, against centred weights
    _, d = intq.quantize_activations_q8(x.reshape(-1, K))
    deq = dequantize_int4(nibbles, sz, group)
    centred = deq - sz[..., 1].float().T.repeat_interleave(group, dim=1)  # (q - 8) s: what the rounding meets
    ref = x.float() @ deq.T
    bound = (d.repeat_interleave(32, dim=1) / 2) @ centred.abs().T * 1.001 + (ref.abs() / 128 if dtype == torch.bfloat16
                                                                              else 1e-4 * ref.abs().amax())
    assert ((twin.float() - ref).abs() <= bound).all()
    assert int4_linear(x, packed, sz, group, N).equal(out) == (rows < intq.DEQUANT_ROWS_INT4)  # a GEMM: widened


def test_int4_dot_is_batch_invariant_and_rejects_what_it_cannot_take() -> None:
    x, _, _ = _case(6, 256, 8, torch.bfloat16)
    nibbles, sz = quantize_int4(torch.randn(64, 256), 32)
    packed = pack_int4(nibbles)
    out = torch.ops.routed.int4_dot(x, packed, sz, 32)
    assert torch.equal(out, torch.cat([torch.ops.routed.int4_dot(x[i : i + 1], packed, sz, 32) for i in range(6)]))
    compiled = torch.compile(lambda x: int4_linear(x, packed, sz, 32, 64), dynamic=False)
    assert torch.equal(compiled(x[:1]), out[:1])
    for bad, match in [((x, packed[:48].contiguous(), sz[:, :48].contiguous(), 32), "multiples of 32"),
                       ((x, packed, sz, 48), "group size"), ((x[:, :128], packed, sz, 32), "features"),
                       ((x, packed, sz.float(), 32), "bf16"), ((x.half(), packed, sz, 32), "fp32 or bf16")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.routed.int4_dot(*bad)


def _experts(bits: int | None, dtype: torch.dtype, E: int = 12, D: int = 256, I: int = 96):
    from routed.model.experts import RoutedExperts

    torch.manual_seed((bits or 16) * 10 + (dtype == torch.bfloat16))
    m = RoutedExperts(E, D, I, dtype)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(m, name).data.copy_(torch.randn(getattr(m, name).shape) / 8 + 0.02)
    if bits is not None:
        m.quantize_(IntFormat(bits, 32))
    m.finalize_()  # float: gate and up as one weight; int4: packed
    if bits == 8:  # as a loaded model holds them (finalize_model)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(m, f"{name}_scales", getattr(m, f"{name}_scales").to(dtype))
    return m


@pytest.mark.parametrize("bits,dtype", [(8, torch.float32), (8, torch.bfloat16), (4, torch.float32),
                                        (4, torch.bfloat16), (None, torch.bfloat16)])
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_a_layers_experts_in_one_call_equal_each_expert_on_its_own(bits: int | None, dtype: torch.dtype,
                                                                    tokens: int) -> None:
    m = _experts(bits, dtype)
    assert m.fused
    x = torch.randn(tokens, 256, dtype=dtype)
    x[-1] *= 30  # tokens of different scales
    # experts shared across tokens: each is read once for its tokens (expert 3 for five of the six)
    ids = torch.tensor([[3, 0, 11, 7], [7, 3, 1, 2], [0, 11, 5, 9], [4, 3, 6, 8], [3, 10, 6, 2], [1, 2, 9, 3]])[:tokens]
    w = torch.rand(tokens, 4)
    out = m._fused(x, ids, w)
    twin = m._reference(x, ids, w)  # each expert's products as int8_dot / int4_dot calls of their own
    assert out.dtype == torch.float32 and out.shape == (tokens, 256)
    # the same products and roundings (bf16 weights: F.linear's sums in another order); silu's exp may round a
    # bf16 intermediate the other way
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, twin, rtol=tol, atol=tol * twin.abs().amax().item())
    assert not torch.equal(out, torch.zeros_like(out))
    for t in range(tokens):  # each token's bits as alone, whichever tokens shared its experts
        assert torch.equal(out[t], m._fused(x[t : t + 1], ids[t : t + 1], w[t : t + 1])[0])
    # what the layer runs for a few tokens, with ids as the gate gives them (any layout) and bf16 weights
    y, counts = m(x, ids.t().contiguous().t(), w.to(dtype))
    torch.testing.assert_close(y.float(), m._fused(x, ids, w.to(dtype)).to(dtype).float(), rtol=0, atol=0)
    assert counts.sum() == 4 * tokens


@pytest.mark.parametrize("bits", [8, 4, None])
def test_a_layers_experts_in_one_call_reject_what_they_cannot_take(bits: int | None) -> None:
    m = _experts(bits, torch.float32 if bits else torch.bfloat16)
    x, ids, w = torch.randn(2, 256), torch.tensor([[1, 2], [3, 4]]), torch.rand(2, 2)
    for bad, match in [((x, ids + 10, w), r"expert id 12 is not in \[0, 12\)"), ((x, ids.int(), w), "int64"),
                       ((x, ids, w[:1]), "weights"), ((x[:, :128], ids, w), "x must be")]:
        with pytest.raises(RuntimeError, match=match):
            m._fused(*bad)
    assert m._fused(x[:0], ids[:0], w[:0]).shape == (0, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,K,N", [(1, 1024, 512), (3, 100, 37), (1, 7, 5), (2, 2816, 64)])
def test_bf16_dot_is_the_fp32_sum_of_bf16_products(dtype: torch.dtype, rows: int, K: int, N: int) -> None:
    torch.manual_seed(K + N)
    w, x = torch.randn(N, K).bfloat16(), torch.randn(rows, K, dtype=dtype)
    out = torch.ops.routed.bf16_dot(x, w)
    ref = x.double() @ w.double().T  # exact products of the same inputs
    assert out.dtype == dtype and out.shape == (rows, N)
    # fp32 sums (K terms) and one rounding to x's dtype
    bound = K * 2**-23 * (x.double().abs() @ w.double().abs().T) + ref.abs() * (2**-8 if dtype == torch.bfloat16 else 0)
    assert ((out.double() - ref).abs() <= bound * 1.01 + 1e-30).all()
    assert torch.equal(torch.ops.routed.bf16_dot(x.view(rows, 1, K), w), out.view(rows, 1, N))
    for bad, match in [((x, w.float()), "bf16"), ((x[:, :-1], w), "features"), ((x.half(), w), "fp32 or bf16")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.routed.bf16_dot(*bad)


def test_a_decode_batch_of_bf16_rows_runs_on_bf16_dot_in_inference() -> None:
    """Up to BF16_DOT_ROWS rows (a batched decode step's) through bf16_dot, each row as it would be alone."""
    from routed.model import gemv

    w, x = torch.randn(300, 256).bfloat16(), torch.randn(1, 256).bfloat16()
    rows = torch.randn(gemv.BF16_DOT_ROWS + 1, 1, 256).bfloat16()
    with torch.inference_mode():
        assert gemv.takes_bf16_dot(x, w) and torch.equal(gemv.linear(x, w), torch.ops.routed.bf16_dot(x, w))
        assert not gemv.takes_bf16_dot(x, w.t().contiguous().t())  # not contiguous: F.linear
        batch = rows[: gemv.BF16_DOT_ROWS]
        assert gemv.takes_bf16_dot(batch, w) and not gemv.takes_bf16_dot(rows, w)  # more rows: the GEMM
        out = gemv.linear(batch, w)
        assert out.shape == (gemv.BF16_DOT_ROWS, 1, 300)
        for i in range(gemv.BF16_DOT_ROWS):  # batch-invariant: the same bits as the row's own product
            assert torch.equal(out[i], gemv.linear(batch[i], w))
    assert not gemv.takes_bf16_dot(x, w)  # autograd on (training)
