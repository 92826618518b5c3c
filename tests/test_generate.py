"""Cached decode against the full forward, and generation against transformers' greedy generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import routed
from conftest import YARN, make_checkpoint
from routed.errors import RoutedError
from routed.model import attention
from routed.model.attention import PagedBatch, use_naive
from routed.sampling import SamplingParams, filter_logits, greedy_ids

VOCAB = 129280  # the real DeepSeek-V3 tokenizer


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", tokenizer=True, vocab_size=VOCAB,
                           hidden_size=32, rope_parameters=YARN)


@pytest.mark.parametrize("attn", ["auto", "absorb", "naive"])
def test_paged_incremental_decode_equals_full_forward(ckpt, attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = ckpt
    model = routed.load_model(folder, torch.float32, progress=False)
    model.set_impl(attn=attn)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 3)  # the naive form's causal query chunks, several per step
    B, T, prefix = 3, 20, 7
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0))
    # row r owns slots [r*64, r*64 + T) of the cache, scattered in reverse block order to exercise indexing
    cache = model.new_cache(B * 64)
    slot = lambda r, p: (B - 1 - r) * 64 + p  # noqa: E731

    def step(start: int, end: int) -> torch.Tensor:
        n = end - start
        batch = PagedBatch(
            cache, torch.tensor([slot(r, p) for r in range(B) for p in range(start, end)]),
            [(r * n, (r + 1) * n) for r in range(B)],
            [torch.tensor([slot(r, p) for p in range(end)]) for r in range(B)],
        )
        h = model.forward_hidden(ids[:, start:end].reshape(1, -1), torch.arange(start, end).repeat(B)[None], batch)
        return model.logits(h).view(B, n, -1)

    with torch.no_grad():
        full = model(ids)
        chunk = prefix + 6  # a prompt, a second chunk of it over the cached first, then one token at a time
        incremental = torch.cat([step(0, prefix), step(prefix, chunk)] + [step(t, t + 1) for t in range(chunk, T)],
                                dim=1)
    assert ((incremental - full).abs().max() / full.abs().max()).item() < 1e-5


def test_decoding_sequences_attend_in_one_padded_product_as_each_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 step's one-token sequences (contexts of 5 and 9 keys, beside a 3-token chunk over 12) attend in one
    padded latent product, each as it would alone (to a bf16 rounding: fp32 sums over the padded keys)."""
    g = torch.Generator().manual_seed(3)
    H, N, R, V, L = 4, 16, 8, 16, 32
    cache = (torch.randn(1, 64, L + R, generator=g) * 0.5).bfloat16()
    kv_b = (torch.randn(H, N + V, L, generator=g) * 0.3).bfloat16()
    contexts, tokens = [5, 12, 9], [1, 3, 1]
    slots = torch.randperm(64, generator=g)
    key_slots = [slots[16 * j : 16 * j + S] for j, S in enumerate(contexts)]
    rows = sum(tokens)
    q_nope = torch.randn(1, rows, H, N, generator=g).bfloat16()
    q_pe = torch.randn(1, rows, H, R, generator=g).bfloat16()
    latent = torch.randn(1, rows, L + R, generator=g).bfloat16()
    starts = [0, 1, 4]
    positions = torch.tensor([[S - T + t for S, T in zip(contexts, tokens) for t in range(T)]])
    new_slots = torch.cat([k[-T:] for k, T in zip(key_slots, tokens)])
    calls = []
    matmuls = attention._latent_matmuls
    monkeypatch.setattr(attention, "_latent_matmuls", lambda *a: calls.append(a[1].shape[0]) or matmuls(*a))

    def attend(seqs: list[int]) -> torch.Tensor:
        at, bounds, picks = 0, [], []
        for j in seqs:
            bounds.append((at, at + tokens[j]))
            picks += range(starts[j], starts[j] + tokens[j])
            at += tokens[j]
        batch = PagedBatch(cache.clone(), torch.cat([new_slots[starts[j] : starts[j] + tokens[j]] for j in seqs]),
                           bounds, [key_slots[j] for j in seqs])
        return attention.paged_attention("absorb", 0, batch, q_nope[:, picks], q_pe[:, picks], latent[:, picks],
                                         positions[:, picks], kv_b, 0.125)

    together = attend([0, 1, 2])
    assert calls == [2, 1]  # the two decoding sequences in one product, the chunk on its own
    for j in range(3):
        alone = attend([j])[0]
        mine = together[0, starts[j] : starts[j] + tokens[j]]
        torch.testing.assert_close(mine.float(), alone.float(), rtol=1e-2, atol=1e-2 * float(alone.abs().max()))


def test_auto_attention_picks_the_form_with_fewer_multiply_adds() -> None:
    kv_b_v3 = torch.empty(128, 128 + 128, 512, device="meta")  # DeepSeek-V3: H 128, N = V = 128, L = 512
    assert use_naive(4096, 4096, kv_b_v3, 128)  # a whole prompt: expand once
    assert not use_naive(1, 4096, kv_b_v3, 128)  # decode: attend in the latent
    assert not use_naive(64, 4096, kv_b_v3, 128)  # a short chunk over a long cached context
    # the crossover: L·(N+V)·(S−T) < T·S·(2L−N−V), with S = 4096 at T = 163.8
    assert use_naive(164, 4096, kv_b_v3, 128) and not use_naive(163, 4096, kv_b_v3, 128)


def test_greedy_generate_matches_transformers(chat_ckpt) -> None:
    folder, reference = chat_ckpt
    llm = routed.LLM(folder, dtype="fp32", progress=False)
    prompts = ["The capital of France is", "def fibonacci(n):\n    return", "你好"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params)  # one static batch, prompts of different lengths
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                          pad_token_id=0, attention_mask=torch.ones_like(ids))
        assert out.token_ids == expected[0, ids.shape[1]:].tolist(), prompt
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == "length"


def test_stops_and_seeds(chat_ckpt) -> None:
    folder, _ = chat_ckpt
    llm = routed.LLM(folder, dtype="fp32", progress=False)
    base = llm.generate("Once upon a time", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    # a stop token id ends generation at that token
    stop_tok = base.token_ids[4]
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=10, temperature=0,
                                                           stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # a stop string cuts the text before it
    stop = base.text[len(base.text) // 2 :][:3]
    if stop.strip():
        out = llm.generate("Once upon a time", SamplingParams(max_tokens=10, temperature=0, stop=[stop]))[0]
        assert out.text == base.text[: base.text.index(stop)] and out.finish_reason == "stop"
    # seeded sampling is reproducible, and top_k=1 is greedy
    sampled = [llm.generate("Once", SamplingParams(max_tokens=8, temperature=1.0, seed=7))[0].token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    top1 = llm.generate("Once upon a time", SamplingParams(max_tokens=10, temperature=0.8, top_k=1, seed=3,
                                                            ignore_eos=True))[0]
    assert top1.token_ids == base.token_ids


def test_streaming_text_equals_final_text(chat_ckpt) -> None:
    folder, _ = chat_ckpt
    llm = routed.LLM(folder, dtype="fp32", progress=False)
    pieces: list[str] = []
    out = llm.chat([{"role": "user", "content": "Write a haiku 🙂"}],
                   SamplingParams(max_tokens=15, temperature=0.9, seed=1),
                   on_text=lambda row, delta: pieces.append(delta))[0]
    assert "".join(pieces) == out.text and "\ufffd" not in "".join(pieces[:-1])


def test_filter_logits_top_p_keeps_the_crossing_token() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, 1.0, 0, 0.7).isfinite().tolist()
    assert kept == [True, True, False, False]
    assert filter_logits(logits, 1.0, 3, 1.0).isfinite().tolist() == [True, True, True, False]


def test_greedy_ids_equal_torch_argmax_with_ties_and_nans() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 129280, generator=g)
    logits[1, [7, 90000]] = 50.0  # a tie: the first
    logits[2, [3, 100]] = float("nan")  # NaN counts as the largest, the first of them
    logits[3] = float("-inf")
    logits[4, -1] = float("inf")
    expected = torch.argmax(logits, dim=-1).tolist()
    assert expected[1:] == [7, 3, 0, 129279]
    with torch.inference_mode():
        assert greedy_ids(logits) == expected
        assert [greedy_ids(row[None])[0] for row in logits] == expected
        assert greedy_ids(logits[:, ::2]) == torch.argmax(logits[:, ::2], dim=-1).tolist()  # a strided view


def test_bad_requests_are_clear_errors(chat_ckpt) -> None:
    folder, _ = chat_ckpt
    llm = routed.LLM(folder, dtype="fp32", progress=False)
    with pytest.raises(RoutedError, match="context"):
        llm.generate([[1] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(RoutedError, match="outside the vocabulary"):
        llm.generate([[VOCAB + 5]], SamplingParams(max_tokens=2))
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)):
        with pytest.raises(RoutedError):
            SamplingParams(**bad)
