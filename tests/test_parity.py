"""Logits parity with transformers' DeepseekV3/V2ForCausalLM in fp32 over the architecture's variants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import routed
from conftest import YARN, make_checkpoint

TOL = 1e-4

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # V3 style: sigmoid + correction bias + group top-2 sum
    "v3_qlora_groups_yarn": ("v3", dict(rope_parameters=YARN)),
    "v3_no_qlora_one_group": ("v3", dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                                         routed_scaling_factor=1.0)),
    "v3_norm_off_4_groups": ("v3", dict(norm_topk_prob=False, n_group=4, topk_group=2, num_experts_per_tok=3,
                                        routed_scaling_factor=1.7)),
    "v3_yarn_v3_mscale_dense2": ("v3", dict(first_k_dense_replace=2, num_hidden_layers=4, rope_parameters={
        **YARN, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 16})),
    # V2 style: softmax gating, no bias
    "v2_lite_greedy_yarn": ("v2", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                       routed_scaling_factor=1.0, n_shared_experts=2, rope_parameters=YARN)),
    "v2_group_limited": ("v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    norm_topk_prob=False, routed_scaling_factor=16.0, num_experts_per_tok=3)),
}

INPUT = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    arch, overrides = CONFIGS[name]
    folder, reference = make_checkpoint(tmp_path / name, arch=arch, **overrides)
    with torch.no_grad():
        expected = reference(INPUT).logits
    model = routed.load_model(folder, torch.float32, progress=False)
    errors = {}
    for attn in ("absorb", "naive"):
        model.set_impl(attn=attn)
        with torch.no_grad():
            errors[attn] = rel_err(model(INPUT), expected)
    print(f"\nparity {name}: absorb {errors['absorb']:.2e}  naive {errors['naive']:.2e}")
    assert max(errors.values()) <= TOL, errors


def test_reference_experts_match_grouped(ckpt: tuple[Path, Any]) -> None:
    folder, _ = ckpt
    model = routed.load_model(folder, torch.float32, progress=False)
    with torch.no_grad():
        fast = model(INPUT[:, :12])
        model.set_impl(experts="reference")
        slow = model(INPUT[:, :12])
    assert rel_err(fast, slow) < 1e-6


@pytest.mark.parametrize("tokens", [3, 200])  # a decode batch's few rows, a prefill's many per expert
def test_grouped_experts_match_reference_in_bf16(tokens: int, half_products: bool) -> None:
    """The bf16 grouped path (F.grouped_mm over the expert-sorted rows on the CPU; without native bf16 products,
    one expert at a time in fp32) against the per-pair twin."""
    from routed.model.experts import RoutedExperts

    g = torch.Generator().manual_seed(tokens)
    experts = RoutedExperts(16, 128, 64, torch.bfloat16)
    for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    x = torch.randn(tokens, 128, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(tokens)])
    weights = torch.rand(tokens, 4, generator=g)
    fast, counts = experts(x, ids, weights, "grouped")
    slow, _ = experts(x, ids, weights, "reference")
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=16))
    torch.testing.assert_close(fast, slow, rtol=8e-3, atol=1e-3)  # one bf16 rounding of the fp32 sums apart


def test_grouped_experts_give_each_expert_a_bucketed_row_count(monkeypatch: pytest.MonkeyPatch, native_half) -> None:
    """Each expert's rows in the grouped products padded to a multiple of EXPERT_ROWS_MULTIPLE (fewer: as they
    are; oneDNN keeps a kernel per shape); the result stays the reference's."""
    from routed.model import experts as experts_mod

    g = torch.Generator().manual_seed(1)
    experts = experts_mod.RoutedExperts(16, 128, 64, torch.bfloat16)
    for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    x = torch.randn(300, 128, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(300)])
    weights = torch.rand(300, 4, generator=g)
    groups = []
    grouped_mm = experts_mod.F.grouped_mm
    monkeypatch.setattr(experts_mod.F, "grouped_mm", lambda a, b, offs: groups.append(
        torch.diff(offs, prepend=offs.new_zeros(1)).tolist()) or grouped_mm(a, b, offs=offs))
    with torch.inference_mode():
        fast, counts = experts(x, ids, weights, "grouped")
        slow, _ = experts(x, ids, weights, "reference")
    rows = groups[0]
    assert len(groups) == 3 and all(g == rows for g in groups)
    m = experts_mod.EXPERT_ROWS_MULTIPLE
    assert rows == [c if c < m else -(-c // m) * m for c in counts.tolist()]
    assert any(c % m for c in counts.tolist() if c > m)  # some padding happened
    torch.testing.assert_close(fast, slow, rtol=8e-3, atol=1e-3)


def test_finalized_float_experts_run_gate_and_up_as_one_grouped_product(monkeypatch: pytest.MonkeyPatch,
                                                                        native_half) -> None:
    """After finalize_, gate_proj and up_proj are the halves of one [E, 2I, D] tensor (same values) and the grouped
    path runs them as one product: two grouped products instead of three, the result as before."""
    from routed.model import experts as experts_mod

    g = torch.Generator().manual_seed(2)
    experts = experts_mod.RoutedExperts(16, 128, 64, torch.bfloat16)
    for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    gate, up = experts.gate_proj.clone(), experts.up_proj.clone()
    x = torch.randn(300, 128, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(300)])
    weights = torch.rand(300, 4, generator=g)
    with torch.inference_mode():
        before, _ = experts(x, ids, weights, "grouped")
    assert experts._gate_up() is None
    experts.finalize_()
    assert torch.equal(experts.gate_proj, gate) and torch.equal(experts.up_proj, up)
    assert torch.equal(experts._gate_up(), torch.cat([gate, up], dim=1))
    calls = []
    grouped_mm = experts_mod.F.grouped_mm
    monkeypatch.setattr(experts_mod.F, "grouped_mm", lambda a, b, offs: calls.append(b.shape) or grouped_mm(a, b, offs=offs))
    with torch.inference_mode():
        after, _ = experts(x, ids, weights, "grouped")
    assert calls == [(16, 128, 128), (16, 64, 128)]
    assert torch.equal(after, before)  # bf16 products accumulate each output the same way at 2I columns


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
def test_gemm_pads_rows_to_a_multiple_and_equals_linear(rows: int, monkeypatch: pytest.MonkeyPatch, native_half) -> None:
    """gemv.gemm: a bf16 product of 16 rows or more runs over zero-padded rows (a multiple of 16: oneDNN keeps a
    kernel per shape), fewer rows as they are; the result is F.linear's on the real rows."""
    from routed.model import gemv

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 96, generator=g).bfloat16()
    w = torch.randn(48, 96, generator=g).bfloat16()
    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(gemv.F, "linear", lambda a, b, bias=None: seen.append(a.numel() // 96) or linear(a, b, bias))
    with torch.inference_mode():
        y = gemv.gemm(x, w)
    assert y.shape == (1, rows, 48)
    assert seen == [rows if rows < 16 else -(-rows // 16) * 16]
    torch.testing.assert_close(y.float(), (x.float() @ w.float().T), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 7, 8, 16, 40])
def test_gemm_without_native_bf16_runs_in_fp32_over_row_chunks(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv.gemm on a CPU without native bf16 products: from FP32_ROWS rows on, x and the weight widened to fp32
    (the weight a chunk of rows at a time), the fp32 product rounded once to bf16 — F.linear in fp32, rounded (up
    to ROWS_MULTIPLE rows, as W xᵀ: the same products, summed in the BLAS's order for that shape); fewer rows take
    the bf16 product as they are."""
    from routed.model import gemv

    monkeypatch.setattr(gemv, "native_half_products", lambda dtype: False)
    monkeypatch.setattr(gemv, "DEQUANT_CHUNK", 96 * 20)  # 20 rows of the weight per chunk: 48 = 16 + 16 + 16
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 96, generator=g).bfloat16()
    w = torch.randn(48, 96, generator=g).bfloat16()
    seen = []
    linear, mm = torch.nn.functional.linear, torch.mm
    monkeypatch.setattr(gemv.F, "linear", lambda a, b, bias=None: seen.append((a.dtype, b.shape[0])) or linear(a, b, bias))
    monkeypatch.setattr(gemv.torch, "mm", lambda a, b: seen.append((a.dtype, a.shape[0])) or mm(a, b))
    with torch.inference_mode():
        y = gemv.gemm(x, w)
    monkeypatch.setattr(gemv.torch, "mm", mm)
    assert y.shape == (1, rows, 48) and y.dtype == torch.bfloat16
    if rows < gemv.FP32_ROWS:
        assert seen == [(torch.bfloat16, 48)]
        return
    assert seen == [(torch.float32, 16)] * 3
    if rows > gemv.ROWS_MULTIPLE:
        assert torch.equal(y, (x.float() @ w.float().T).bfloat16())
    else:  # fp32 sums in another order, rounded once: within a bf16 rounding of the fp32 product
        torch.testing.assert_close(y.float(), x.float() @ w.float().T, rtol=2**-8, atol=1e-6)


def test_a_short_query_chunk_over_widened_keys_attends_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without native bf16 products, paged_attention widens a prompt's keys to fp32 once; a last query chunk of
    fewer than FP32_ROWS queries attends over them in fp32 too (no narrowing of the keys back to bf16): the
    fp32 attention of its bf16 inputs, rounded once."""
    from routed.model import gemv
    from routed.model.attention import attend_expanded

    monkeypatch.setattr(gemv, "native_half_products", lambda dtype: False)
    g = torch.Generator().manual_seed(3)
    q_nope, q_pe = torch.randn(1, 2, 4, 16, generator=g).bfloat16(), torch.randn(1, 2, 4, 8, generator=g).bfloat16()
    k, v = torch.randn(1, 4, 10, 24, generator=g).bfloat16(), torch.randn(1, 4, 10, 16, generator=g).bfloat16()
    mask = torch.ones(1, 2, 10, dtype=torch.bool).tril(diagonal=8)
    seen = []
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: seen.append((a.dtype, b.dtype)) or matmul(a, b))
    out = attend_expanded(q_nope, q_pe, k.float(), v.float(), mask, 0.25, masked_from=8)
    monkeypatch.setattr(torch, "matmul", matmul)
    assert seen == [(torch.float32, torch.float32)] * 2 and out.dtype == torch.bfloat16
    q = torch.cat([q_nope, q_pe], dim=-1).float().mul(0.25).transpose(1, 2)
    scores = (q @ k.float().transpose(-1, -2)).masked_fill(~mask.unsqueeze(1), float("-inf"))
    torch.testing.assert_close(out, (torch.softmax(scores, -1) @ v.float()).transpose(1, 2).bfloat16())


def test_bf16_softmax_is_fp32_softmax_rounded() -> None:
    """attend_expanded takes the softmax of bf16 scores directly: that must be the fp32 softmax rounded once to
    bf16 (spec trap 14: softmax in fp32), masked keys included."""
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(16, 128, 512, generator=g) * 4).bfloat16()
    scores[..., 300:].masked_fill_(torch.rand(16, 128, 212, generator=g) < 0.5, float("-inf"))
    probs = torch.nn.functional.softmax(scores, dim=-1)
    assert probs.dtype == torch.bfloat16
    assert torch.equal(probs, torch.nn.functional.softmax(scores.float(), dim=-1).bfloat16())


def test_absorbed_and_naive_in_bf16_track_fp32(ckpt: tuple[Path, Any], half_products: bool) -> None:
    """Both attention forms in bf16 against the fp32 model: within bf16 noise of it (the absorbed form's latent
    attention runs in fp32, the naive form's scores are bf16 — neither is the other's reference), with bf16
    products native or widened to fp32."""
    folder, _ = ckpt
    with torch.no_grad():
        reference = routed.load_model(folder, torch.float32, progress=False)(INPUT)
        model = routed.load_model(folder, torch.bfloat16, progress=False)
        for attn in ("absorb", "naive"):
            model.set_impl(attn=attn)
            logits = model(INPUT).float()
            # bf16 rounding can flip a near-tied routing choice for a token or two; the bulk must agree
            mean_rel = ((logits - reference).abs().mean() / reference.abs().mean()).item()
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            assert mean_rel < 5e-2 and agree > 0.9, (attn, mean_rel, agree)
