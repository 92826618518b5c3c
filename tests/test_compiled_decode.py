"""The compiled one-token decode step (Transformer.compile_decode) equals its eager twin.

With float, int8 and int4 weights (fp32 activations, so the two agree to rounding): same greedy tokens and
log-probabilities, same latents in the cache, same routing counts over the run; prefill and multi-sequence
steps stay eager. An engine with routing telemetry off gets a compiled step that does not count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.loader import load_model
from routed.model.attention import PagedBatch
from routed.sampling import SamplingParams
from routed.tokenizer import Tokenizer

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, _ = make_checkpoint(tmp_path_factory.mktemp("compiled") / "ckpt", tokenizer=True, vocab_size=129280,
                             hidden_size=32)
    return out


def generate(model, folder: Path, prompts: list[list[int]], **config):
    """One request at a time (decode at batch 1): tokens, logprobs, each router's counters, the cache."""
    eng = LLMEngine(model, Tokenizer.from_pretrained(folder), EngineConfig(**config))
    results = []
    for i, ids in enumerate(prompts):
        eng.add_request(ids, PARAMS, f"r{i}")
        tokens, logprobs = [], []
        while eng.has_unfinished():
            for o in eng.step():
                tokens += o.new_token_ids
                logprobs += [(lp.logprob, [v for _, v in lp.top]) for lp in o.logprobs]
        results.append((tokens, logprobs))
    total = eng.routing.cumulative  # what the routers counted over every step (the engine reads them per step)
    counters = list(zip(total.experts_LE, total.weight_LE, total.stats_L4))
    return results, counters, eng.runner.cache.clone()


@pytest.mark.parametrize("quant,fused_int8,own_kernels", [
    (None, None, None), ("int8", True, False), ("int8", False, False), ("int8", False, True), ("int4", None, False),
    ("int4", None, True)], ids=["float", "int8-fused", "int8-kernel", "int8-dot", "int4-kernel", "int4-dot"])
def test_compiled_decode_equals_eager_fp32(folder: Path, quant: str | None, fused_int8: bool | None,
                                           own_kernels: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 each way a CPU runs it: fused multiply-sums with the experts gathered in place (AVX-512,
    `intq.FUSED_INT8_LOADS`), PyTorch's int8 kernel per chosen expert, or routed's `int8_dot` with a layer's experts
    in one `int8_experts` call (AVX2, `kernels.int_dot`); int4 on PyTorch's kernel or routed's `int4_dot` and
    `int4_experts`."""
    from routed.model.experts import RoutedExperts
    from routed.quant import intq, kernels

    if fused_int8 is not None:
        monkeypatch.setattr(intq, "FUSED_INT8_LOADS", fused_int8)
    if own_kernels is True and not (kernels.int_dot() and (quant == "int8" or kernels.INT4_DOT)):
        pytest.skip("routed's kernels run on AVX2 CPUs only")
    if own_kernels is False:
        monkeypatch.setattr(kernels, "int_dot", lambda: False)
        monkeypatch.setattr(kernels, "INT8_DOT", False)
        monkeypatch.setattr(kernels, "INT4_DOT", False)
    model = load_model(folder, torch.float32, progress=False, quant=quant)
    prompts = [[100 + i for i in range(9)], [5000, 17, 4242, 9], [42]]  # one token: its first step has one key
    eager, eager_counts, eager_cache = generate(model, folder, prompts)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert model.compile_decode()
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks  # each call one whole graph
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    assert experts.gathers == (quant is None or fused_int8 is True)
    assert (experts.few_tokens_fn is not None) == experts.gathers  # batched steps: gathered, or grouped kernels
    assert experts.fused == (own_kernels is True)  # routed's kernels: a layer's experts in one call
    plan = model._one_token_plan
    # up to DECODE_CHUNK consecutive blocks per call: the dense first layer and the MoE layers in one
    assert [(first, len(blocks)) for _, first, blocks in plan] == [(0, model.config.num_hidden_layers)]
    calls = []

    def counted(fn):  # a compiled call, counted
        def run(*args):
            calls.append((args[1].shape[1], len(args[0])))
            return fn(*args)
        return run

    model._one_token_plan = [(counted(fn), first, blocks) for fn, first, blocks in plan]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fast, fast_counts, fast_cache = generate(model, folder, prompts)
    # compiled at load by one step at 3 keys, never again (the contexts here run 1 to 19 keys)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert calls == [(1, len(blocks)) for _, _, blocks in plan] * (9 * len(prompts))  # every decode step, no prefill
    for (tok_e, lp_e), (tok_f, lp_f) in zip(eager, fast):
        assert tok_f == tok_e
        torch.testing.assert_close(torch.tensor([lp for lp, _ in lp_f]), torch.tensor([lp for lp, _ in lp_e]),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor([t for _, t in lp_f]), torch.tensor([t for _, t in lp_e]),
                                   rtol=0, atol=1e-4)
    torch.testing.assert_close(fast_cache, eager_cache, rtol=1e-4, atol=1e-5)
    for (c_e, w_e, s_e), (c_f, w_f, s_f) in zip(eager_counts, fast_counts):
        assert torch.equal(c_f, c_e)  # the same experts chosen, counted once per (token, slot)
        torch.testing.assert_close(w_f, w_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s_f, s_e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant,own_kernels", [(None, False), (None, True), ("int8", False)],
                         ids=["bf16", "bf16-dot", "int8-kernel"])
def test_compiled_decode_bf16_step_matches_eager(tiny_preset: Path, quant: str | None, own_kernels: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 through inductor's fused loops or routed's `bf16_dot` / `bf16_experts` (AVX2), and int8 through
    PyTorch's kernel (`intq.FUSED_INT8_LOADS` off, as on AVX2): the loaded model holds its int8 scales in bf16,
    the only way inductor's lowering of the kernel takes them."""
    from routed.model.experts import RoutedExperts
    from routed.quant import intq, kernels
    from routed.quant.linear import QLinear

    monkeypatch.setattr(intq, "FUSED_INT8_LOADS", False)
    if own_kernels and not kernels.int_dot():
        pytest.skip("routed's kernels run on AVX2 CPUs only")
    if not own_kernels:
        monkeypatch.setattr(kernels, "int_dot", lambda: False)
        for flag in ("INT8_DOT", "INT4_DOT", "BF16_DOT"):
            monkeypatch.setattr(kernels, flag, False)
    model = load_model(tiny_preset, "bf16", progress=False, quant=quant)
    assert next(m for m in model.modules() if isinstance(m, RoutedExperts)).fused == own_kernels
    if quant:
        assert {m.scales.dtype for m in model.modules() if isinstance(m, QLinear)} == {torch.bfloat16}
    assert model.compile_decode(allow_native=False)  # with routed's kernels the native layer would take the step
    for _, gate in model.gates():
        assert int(gate.expert_counts.sum()) == 0  # the warm-up leaves no trace in the telemetry
    cache = model.new_cache(64)
    prompt = torch.tensor([[7, 300, 12000, 45, 9, 1001]])
    logits = {}
    with torch.inference_mode():
        for name, plan in (("eager", None), ("compiled", model._one_token_plan)):
            saved, model._one_token_plan = model._one_token_plan, plan
            cache.zero_()
            n = prompt.shape[1]
            model.forward_hidden(prompt, torch.arange(n)[None], PagedBatch(cache, torch.arange(n), [(0, n)],
                                                                         [torch.arange(n)]))
            steps = []
            for pos, tok in zip(range(n, n + 3), (3, 77, 1500)):
                batch = PagedBatch(cache, torch.tensor([pos]), [(0, 1)], [torch.arange(pos + 1)])
                steps.append(model.logits(model.forward_hidden(torch.tensor([[tok]]), torch.tensor([[pos]]), batch)))
            logits[name] = torch.cat(steps)
            model._one_token_plan = saved
    eager, fast = logits["eager"], logits["compiled"]
    # bf16: the compiled block keeps intermediates in fp32 where eager rounds each op; a few bf16 roundings apart
    torch.testing.assert_close(fast, eager, rtol=0.03, atol=0.03 * float(eager.abs().max()))
    assert torch.equal(fast.argmax(-1), eager.argmax(-1))


def test_compiled_decode_follows_telemetry_switch(folder: Path) -> None:
    """The compiled step's guards keep the modules' plain attributes: an engine with routing telemetry off gets a
    step that does not count (compiled for it when the engine is made), and telemetry back on counts again."""
    model = load_model(folder, torch.float32, progress=False)
    assert model.compile_decode()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prompt = [100 + i for i in range(5)]
    _, counts, _ = generate(model, folder, [prompt], routing_telemetry=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # compiled when the engine was made
    assert all(int(c.sum()) == 0 for c, _, _ in counts)
    _, counts, _ = generate(model, folder, [prompt])
    top_k = model.config.num_experts_per_tok
    # 5 prompt tokens and 9 decoded ones fed back (the 10th is never run), top_k experts each, in every layer
    assert [int(c.sum()) for c, _, _ in counts] == [(5 + 9) * top_k] * len(model.gates())


def test_compiled_chunks_share_a_graph_across_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of the same block kinds share one compiled graph whatever layer they start at (a symbolic `first`,
    the cache layer each block writes and reads): 2 blocks per call over a dense layer and 7 MoE layers gives
    calls of (dense, MoE) and three of (MoE, MoE) — two functions — with the same tokens and log-probabilities
    as eager, and no compile on the way."""
    from routed.model import deepseek_v3

    folder, _ = make_checkpoint(tmp_path / "ckpt", tokenizer=True, vocab_size=129280, hidden_size=48,
                                num_hidden_layers=8)
    monkeypatch.setattr(deepseek_v3, "DECODE_CHUNK", 2)
    model = load_model(folder, torch.float32, progress=False)
    prompts = [[100 + i for i in range(7)]]
    eager, eager_counts, eager_cache = generate(model, folder, prompts)
    assert model.compile_decode()
    plan = model._one_token_plan
    assert [(first, len(blocks)) for _, first, blocks in plan] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert plan[1][0] is plan[2][0] is plan[3][0] and plan[0][0] is not plan[1][0]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fast, fast_counts, fast_cache = generate(model, folder, prompts)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert fast[0][0] == eager[0][0]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in fast[0][1]]), torch.tensor([lp for lp, _ in eager[0][1]]),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(fast_cache, eager_cache, rtol=1e-4, atol=1e-5)
    for (c_e, _, _), (c_f, _, _) in zip(eager_counts, fast_counts):
        assert torch.equal(c_f, c_e)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_few_token_steps_gather_experts_as_grouped_does(folder: Path, quant: str | None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """After compile_decode, eager steps of a few tokens (batched decode) run float and int8 experts (where int8
    products are fused, `intq.FUSED_INT8_LOADS`: pinned here) through the compiled `gathered` when `gather_pays` —
    equal to the grouped path, for any token count without a compile after load; an engine decoding three
    sequences together gives the eager model's tokens."""
    from routed.model.experts import RoutedExperts, gather_pays
    from routed.quant import intq, kernels

    monkeypatch.setattr(intq, "FUSED_INT8_LOADS", True)  # as with AVX-512, where routed's int8 kernel stays off
    monkeypatch.setattr(kernels, "int_dot", lambda: False)
    monkeypatch.setattr(kernels, "INT8_DOT", False)
    monkeypatch.setattr(kernels, "INT4_DOT", False)

    def together(prompts: list[list[int]]) -> dict[str, list[int]]:
        eng = LLMEngine(model, Tokenizer.from_pretrained(folder), EngineConfig())
        for i, ids in enumerate(prompts):
            eng.add_request(ids, PARAMS, f"r{i}")
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        while eng.has_unfinished():
            for o in eng.step():
                tokens[o.request_id] += o.new_token_ids
        return tokens

    model = load_model(folder, torch.float32, progress=False, quant=quant)
    prompts = [[100 + i for i in range(9)], [5000, 17, 4242, 9], [7, 8, 9, 10, 11, 12]]
    eager = together(prompts)
    assert model.compile_decode()
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    assert experts.few_tokens_fn is not None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    E, K = experts.num_experts, model.config.num_experts_per_tok
    with torch.inference_mode():
        for n in (2, 3, 5):  # 8 experts, top-2: 5 tokens' 10 pairs choose too few distinct ones -> grouped
            assert gather_pays(n, K, E) == (n < 5)
            x = torch.randn(n, model.config.hidden_size, generator=g)
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
            w = torch.rand(n, K, generator=g)
            fast, counts = experts(x, ids, w)
            grouped = experts._grouped(x, ids, w, counts)
            torch.testing.assert_close(fast, grouped, rtol=1e-5, atol=1e-6)
    assert together(prompts) == eager  # three sequences decoding together: 3-token steps
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
