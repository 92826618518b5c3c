"""The engine: batch invariance, chunked prefill, preemption, prefix caching, abort, logprobs, penalties."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_checkpoint
from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.engine.kv_cache import BlockManager, block_hashes
from routed.engine.request import Request
from routed.loader import load_model
from routed.sampling import SamplingParams
from routed.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory):
    folder, _ = make_checkpoint(tmp_path_factory.mktemp("eng") / "ckpt", tokenizer=True, vocab_size=129280,
                                hidden_size=32)
    return load_model(folder, torch.float32, progress=False), Tokenizer.from_pretrained(folder)


def engine(parts, **config) -> LLMEngine:
    model, tok = parts
    return LLMEngine(model, tok, EngineConfig(**config))


def run_all(eng: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]] | None = None):
    """Step until idle; `arrivals[step]` requests are added before that step. -> {request_id: output ids}."""
    outputs: dict[str, list[int]] = {}
    step = 0
    arrivals = arrivals or {}
    while eng.has_unfinished() or any(k >= step for k in arrivals):
        for rid, ids, p in arrivals.get(step, []):
            eng.add_request(ids, p, rid)
        for o in eng.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
        step += 1
    return outputs


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 120000) for _ in range(n)]


def test_batch_invariance_greedy_alone_vs_among_16(parts) -> None:
    rng = random.Random(0)
    target = prompt(rng, 23)
    alone = run_all(engine(parts), {0: [("target", target, GREEDY)]})["target"]
    others = [(f"o{i}", prompt(rng, rng.randrange(3, 60)),
               SamplingParams(max_tokens=rng.randrange(4, 20), temperature=0, ignore_eos=True)) for i in range(16)]
    arrivals = {0: others[:5], 2: others[5:9] + [("target", target, GREEDY)], 3: others[9:13], 7: others[13:]}
    crowded = run_all(engine(parts, max_num_seqs=16, max_num_batched_tokens=64), arrivals)
    assert crowded["target"] == alone
    assert len(crowded) == 17


def test_chunked_prefill_and_preemption_keep_outputs(parts) -> None:
    rng = random.Random(1)
    prompts = [(f"r{i}", prompt(rng, 40 + 7 * i), GREEDY) for i in range(6)]
    roomy = run_all(engine(parts), {0: prompts})
    # 8-token chunks, and a cache of 24 blocks x 4 tokens that cannot hold all six at once: preemption
    tight = engine(parts, max_num_batched_tokens=8, block_size=4, kv_cache_gb=24 * 4 * 3 * 24 * 4 / 2**30)
    assert tight.blocks.num_blocks == 24
    squeezed = run_all(tight, {0: prompts})
    assert squeezed == roomy
    assert tight.preemptions > 0 and tight.blocks.num_free == 24


def test_prefix_cache_reuses_a_shared_system_prompt(parts) -> None:
    rng = random.Random(2)
    system = prompt(rng, 48)
    eng = engine(parts)
    first = run_all(eng, {0: [("a", system + prompt(rng, 5), GREEDY)]})
    assert eng.blocks.prefix_hits == 0
    second_prompt = system + prompt(rng, 9)
    cached = run_all(eng, {0: [("b", second_prompt, GREEDY)]})
    assert eng.blocks.prefix_hits == 48  # three full 16-token blocks of the system prompt
    fresh = run_all(engine(parts, enable_prefix_caching=False), {0: [("b", second_prompt, GREEDY)]})
    assert cached == fresh and first["a"] != cached["b"]
    assert eng.stats().prefix_cache_hit_rate == pytest.approx(48 / (53 + 57))


def test_abort_frees_blocks_at_once(parts) -> None:
    eng = engine(parts)
    eng.add_request(list(range(1000, 1040)), SamplingParams(max_tokens=50, temperature=0), "x")
    eng.step()
    assert eng.blocks.num_free < eng.blocks.num_blocks
    assert eng.abort("x") and not eng.abort("x")
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.has_unfinished()


def test_logprobs_and_penalties(parts) -> None:
    model, _ = parts
    ids = list(range(500, 520))
    eng = engine(parts)
    eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=3), "lp")
    out = eng.step()[0]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
    lp = out.logprobs[0]
    assert lp.token_id == int(expected.argmax()) and lp.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [t for t, _ in lp.top] == expected.topk(3).indices.tolist()
    # a large frequency penalty forbids repeating any generated token
    out = run_all(engine(parts), {0: [("p", ids, SamplingParams(max_tokens=15, temperature=0, ignore_eos=True,
                                                                frequency_penalty=2.0, presence_penalty=2.0))]})
    assert len(set(out["p"])) == 15


def test_requests_that_cannot_fit_are_refused(parts) -> None:
    eng = engine(parts, max_model_len=64)
    with pytest.raises(Exception, match="exceeds the context of 64"):
        eng.add_request(list(range(100, 160)), SamplingParams(max_tokens=10))


def test_block_manager_hash_chain_and_eviction() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Request("a", [1, 2, 3, 4, 5], GREEDY)
    bm.admit(a)
    assert bm.allocate(a, 5) and a.block_table == [0, 1, 2]
    a.num_computed = 5
    bm.commit(a)
    assert bm.hash_of[:3] == [*block_hashes([1, 2, 3, 4], 2), None]
    bm.release(a)
    b = Request("b", [1, 2, 3, 4, 9], GREEDY)
    bm.admit(b)
    assert b.block_table == [0, 1] and b.num_computed == 4  # both full blocks reused
    c = Request("c", [7, 7, 7, 7, 7, 7], GREEDY)
    bm.admit(c)
    assert not bm.allocate(c, 6) and c.block_table == []  # 2 free blocks, 3 needed: nothing taken
    bm.release(b)
    assert bm.allocate(c, 6) and c.block_table == [3, 2, 1]  # least recently freed first
    h0, h1 = block_hashes([1, 2, 3, 4], 2)
    assert bm.cached == {h0: 0}  # block 1 was evicted from the prefix cache, block 0 is still reusable
