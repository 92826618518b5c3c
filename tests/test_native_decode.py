"""The native one-token layer (routed/quant/csrc/layer.cpp, `routed.model.native`) equals its eager twin.

Per block, bf16 / int8 / int4 weights: the same input row and cache through `Block.forward` (eager, the absorbed
attention) and through `DecodeLayer.forward` give the same output and cache row to a few bf16 roundings, and the
router counts the same experts with the same weights and statistics. Through the engine: the native step is the
one-token step after `compile_decode`, with the eager model's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.model import native
from routed.model.attention import PagedBatch
from routed.model.deepseek_v3 import MoE
from routed.quant import kernels
from routed.sampling import SamplingParams
from routed.tokenizer import Tokenizer

# widths routed's kernels take (multiples of 32 where int8 / int4 need them: o_proj's H * V, the experts')
SHAPES = dict(hidden_size=64, v_head_dim=8, kv_lora_rank=32, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not kernels.int_dot():
        pytest.skip("routed's kernels (and the native layer) run on AVX2 CPUs only")
    out, _ = make_checkpoint(tmp_path_factory.mktemp("native") / "ckpt", tokenizer=True, vocab_size=129280, **SHAPES)
    return out


def _close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A few bf16 roundings apart (sums in another order, each step rounded to bf16 on both sides)."""
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.02,
                               atol=0.02 * float(expected.float().abs().max()))


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_native_block_equals_eager(folder: Path, quant: str | None) -> None:
    model = load_model(folder, "bf16", progress=False, quant=quant)
    step = native.build(model)
    assert step is not None and step.has_head
    layers = step.layers
    assert len(layers) == model.config.num_hidden_layers
    g = torch.Generator().manual_seed(1)
    S, D = 11, model.config.hidden_size  # the context: 10 cached tokens and this one, in scattered slots
    cache = (torch.randn(model.new_cache(40).shape, generator=g) * 0.5).to(torch.bfloat16)
    key_slots = torch.randperm(40, generator=g)[:S]
    position = torch.tensor([[S - 1]])
    cos, sin = model.rotary(position)
    with torch.inference_mode():
        for i, block in enumerate(model.model.layers):
            h = torch.randn(1, 1, D, generator=g).to(torch.bfloat16)
            cache_e, cache_n = cache.clone(), cache.clone()
            gate = block.mlp.gate if isinstance(block.mlp, MoE) else None
            if gate is not None:
                gate.counting = True
                gate.reset_counters()
            batch = PagedBatch(cache_e, key_slots[-1:], [(0, 1)], [key_slots])
            eager = block(h, (cos, sin), position, batch, i, "absorb")
            counters = [torch.zeros_like(gate.expert_counts), torch.zeros_like(gate.expert_weight),
                        torch.zeros_like(gate.route_stats)] if gate is not None else []
            out = layers[i].forward(h, cos.reshape(-1), sin.reshape(-1), cache_n, i, int(key_slots[-1]), key_slots,
                                    counters)
            assert out.shape == eager.shape and out.dtype == torch.bfloat16
            _close_bf16(out, eager)
            _close_bf16(cache_n[i, key_slots[-1]], cache_e[i, key_slots[-1]])  # the token's latent, written
            cache_n[i, key_slots[-1]] = cache_e[i, key_slots[-1]]
            assert torch.equal(cache_n, cache_e)  # and nothing else
            if gate is not None:
                assert int(gate.expert_counts.sum()) == model.config.num_experts_per_tok
                assert torch.equal(counters[0], gate.expert_counts)  # the same experts chosen
                torch.testing.assert_close(counters[1], gate.expert_weight, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(counters[2], gate.route_stats, rtol=1e-3, atol=1e-4)


def test_engine_decodes_through_native_layers(folder: Path) -> None:
    """After compile_decode the engine's one-token steps are the native layers' (nothing compiled), with the eager
    model's greedy tokens; prefill stays eager; routing telemetry counts every token as eager does."""
    model = load_model(folder, "bf16", progress=False)
    tok = Tokenizer.from_pretrained(folder)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def generate() -> tuple[list[int], torch.Tensor]:
        eng = LLMEngine(model, tok, EngineConfig())
        eng.add_request([100 + i for i in range(6)], params, "r")
        tokens = []
        while eng.has_unfinished():
            for o in eng.step():
                tokens += o.new_token_ids
        return tokens, eng.routing.cumulative.experts_LE

    eager, eager_counts = generate()
    assert model.compile_decode()
    assert model._native is not None and model._one_token_plan is None
    calls = []

    class Counted:  # the C++ model, each call recorded
        def __init__(self, cpp):
            self.cpp = cpp

        def logits(self, *args):
            calls.append(args[1])  # the token's position
            return self.cpp.logits(*args)

    model._native.model = Counted(model._native.model)
    fast, fast_counts = generate()
    assert fast == eager
    assert calls == list(range(6, 13))  # the 7 decode steps after the prefill, one native call each
    assert torch.equal(fast_counts, eager_counts)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_native_model_equals_eager(folder: Path, quant: str | None) -> None:
    """The whole one-token step (embedding, every block, final norm, lm_head) against the eager model's
    forward_hidden and logits on the same cache, at a position past yarn's original context (RoPE's cos / sin
    computed natively)."""
    model = load_model(folder, "bf16", progress=False, quant=quant)
    assert model._native is None  # the model's own steps stay eager: the reference
    step = native.build(model)
    g = torch.Generator().manual_seed(2)
    S, token = 9, 4242
    cache = (torch.randn(model.new_cache(32).shape, generator=g) * 0.5).to(torch.bfloat16)
    key_slots = torch.randperm(32, generator=g)[:S]
    position = torch.tensor([[5000]])
    cache_e, cache_n = cache.clone(), cache.clone()
    with torch.inference_mode():
        batch_e = PagedBatch(cache_e, key_slots[-1:], [(0, 1)], [key_slots])
        hidden_e = model.forward_hidden(torch.tensor([[token]]), position, batch_e)  # eager: _native is unset
        logits_e = model.logits(hidden_e[0])
        hidden_n = step.hidden(torch.tensor([[token]]), position, PagedBatch(cache_n, key_slots[-1:], [(0, 1)],
                                                                            [key_slots]))
        logits_n = step.logits(torch.tensor([[token]]), position, PagedBatch(cache.clone(), key_slots[-1:], [(0, 1)],
                                                                            [key_slots]))
    assert hidden_n.shape == hidden_e.shape and logits_n.shape == logits_e.shape == (1, model.config.vocab_size)
    assert logits_n.dtype == torch.float32
    _close_bf16(hidden_n, hidden_e)
    _close_bf16(logits_n, logits_e)
    assert int(logits_n.argmax()) == int(logits_e.argmax())
    written = cache_n[:, key_slots[-1]].clone()
    cache_n[:, key_slots[-1]] = cache_e[:, key_slots[-1]]
    assert torch.equal(cache_n, cache_e)  # only the token's slot, in every layer
    _close_bf16(written, cache_e[:, key_slots[-1]])


def test_native_layer_rejects_bad_input(folder: Path) -> None:
    model = load_model(folder, "bf16", progress=False)
    step = native.build(model)
    layer = step.layers[0]
    cache = model.new_cache(8)
    cos, sin = model.rotary(torch.tensor([[2]]))
    h = torch.zeros(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="key slot 99 out of range"):
        layer.forward(h, cos.reshape(-1), sin.reshape(-1), cache, 0, 2, torch.tensor([0, 1, 99]), [])
    with pytest.raises(RuntimeError, match="one bf16 row"):
        layer.forward(h.float(), cos.reshape(-1), sin.reshape(-1), cache, 0, 2, torch.tensor([0, 1, 2]), [])
    with pytest.raises(RuntimeError, match="token id 129280 out of range"):
        step.model.logits(129280, 2, cache, 2, torch.tensor([0, 1, 2]), [])
    with pytest.raises(RuntimeError, match="too few layers"):
        step.model.logits(5, 2, cache[:1].contiguous(), 2, torch.tensor([0, 1, 2]), [])
    with pytest.raises(RuntimeError, match="counters for 1 layers"):
        step.model.logits(5, 2, cache, 2, torch.tensor([0, 1, 2]), [[]])


def test_native_needs_bf16_and_routed_kernels(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 models and CPUs without routed's kernels keep the compiled step."""
    assert native.build(load_model(folder, torch.float32, progress=False)) is None
    model = load_model(folder, "bf16", progress=False)
    monkeypatch.setattr(kernels, "int_dot", lambda: False)
    assert native.build(model) is None
