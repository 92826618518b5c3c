"""Expert parallelism: 2 gloo ranks on this machine give what one process gives; replicas share their
expert's load; a rank that dies or hangs fails the work in flight with a clear error instead of hanging."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.errors import RoutedError
from routed.llm import LLM
from routed.parallel.eplb import Placement
from routed.parallel.ep import ExpertParallel, RankFailed, model_eps
from routed.sampling import SamplingParams

PROMPTS = [list(range(1000, 1000 + n)) for n in (5, 17, 33)]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)


def run(llm: LLM) -> list[tuple[list[int], list]]:
    return [(o.token_ids, o.logprobs) for o in llm.generate_ids(PROMPTS, GREEDY).outputs]


def logprob_table(llm: LLM) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens, and the log-probabilities of each step's top-3 alternatives."""
    tokens, values = [], []
    for ids in PROMPTS:
        rid = llm.engine.add_request(ids, GREEDY)
        out, lps = [], []
        while llm.engine.has_unfinished():
            for o in llm.engine.step():
                assert o.request_id == rid
                out += o.new_token_ids
                lps += [[v for _, v in lp.top] for lp in o.logprobs]
        tokens.append(out)
        values.append(torch.tensor(lps))
    return tokens, torch.cat(values)


@pytest.fixture(scope="module")
def single(tiny_preset: Path) -> tuple[list[list[int]], torch.Tensor]:
    with LLM(tiny_preset, "fp32", progress=False) as llm:
        return logprob_table(llm)


def test_dispatch_covers_every_pair_once_and_splits_replicas() -> None:
    # 4 experts + 2 replicas (of 0 and 3) over 2 ranks: rank 0 slots [0, 1, 3], rank 1 slots [2, 3, 0]
    phy2log = [0, 1, 3, 2, 3, 0]
    ranks = [ExpertParallel(phy2log, r, 2, 4) for r in range(2)]
    ids = torch.tensor([[0, 3], [0, 1], [2, 3], [0, 3], [3, 2]])
    local = [ep.dispatch(ids) for ep in ranks]
    assert ((local[0] >= 0) ^ (local[1] >= 0)).all()  # each pair computed by exactly one rank
    for r, ep in enumerate(ranks):
        held = torch.tensor(ep.local)[local[r].clamp(min=0)]
        assert torch.equal(held[local[r] >= 0], ids[local[r] >= 0])  # the slot holds the pair's expert
    # expert 0 chosen 3 times (slots 0, 5), expert 3 four times (slots 2, 4): replicas within one pair
    slots = ranks[0].slot_tokens
    assert torch.equal(slots, ranks[1].slot_tokens)  # every rank counts every pair identically
    assert slots.tolist() == [2, 1, 2, 2, 2, 1]
    assert ranks[0].rank_tokens().tolist() == [5, 5]


def test_two_ranks_equal_one_process(tiny_preset: Path, single: tuple) -> None:
    threads = torch.get_num_threads()
    with LLM(tiny_preset, "fp32", progress=False, engine_config=EngineConfig(ep=2)) as llm:
        assert torch.get_num_threads() == max(1, threads // 2)  # the two ranks share the cores
        assert len(llm.engine.model.ep_group.procs) == 1
        assert all(len(ep.local) == 8 for ep in model_eps(llm.engine.model))  # 16 experts, half each
        tokens, values = logprob_table(llm)
    assert tokens == single[0]
    torch.testing.assert_close(values, single[1], rtol=0, atol=1e-5)
    assert torch.get_num_threads() == threads  # given back at close


def test_mtp_speculation_under_ep_keeps_greedy_output(tiny_preset: Path, single: tuple) -> None:
    config = EngineConfig(ep=2, speculative="mtp")
    with LLM(tiny_preset, "fp32", progress=False, engine_config=config) as llm:
        tokens, _ = logprob_table(llm)
        assert llm.engine.stats().spec_drafted > 0
    assert tokens == single[0]


def test_placement_replicas_share_load_and_keep_output(tiny_preset: Path, single: tuple, tmp_path: Path) -> None:
    # layers 1 and 2 are MoE; experts 0 and 5 get a second replica on the other rank (18 slots, 9 per rank)
    base = list(range(16))
    phy2log = [0, 1, 2, 3, 4, 5, 6, 7, 5] + [8, 9, 10, 11, 12, 13, 14, 15, 0]
    path = tmp_path / "placement.json"
    Placement(num_ranks=2, num_nodes=1, layers=[1, 2], num_logical=16, phy2log=[phy2log, phy2log]).save(path)
    with LLM(tiny_preset, "fp32", progress=False, engine_config=EngineConfig(ep=2, placement=str(path))) as llm:
        for ep in model_eps(llm.engine.model):
            ep.slot_tokens.zero_()
        tokens, values = logprob_table(llm)
        routed_counts = llm.engine.routing.cumulative.experts_LE  # what the routers chose, counted by the gates
        for layer, ep in enumerate(model_eps(llm.engine.model)):
            counts = ep.slot_tokens
            assert abs(int(counts[0]) - int(counts[17])) <= 1 and counts[0] > 0  # expert 0's two replicas
            assert abs(int(counts[5]) - int(counts[8])) <= 1 and counts[5] > 0  # expert 5's two replicas
            per_expert = torch.zeros(16, dtype=torch.long).index_add_(0, torch.tensor(phy2log), counts)
            assert per_expert.tolist() == routed_counts[layer].long().tolist()  # every pair computed once
    assert base == sorted(set(phy2log))
    assert tokens == single[0]
    torch.testing.assert_close(values, single[1], rtol=0, atol=1e-5)


def test_placement_for_other_rank_count_is_refused(tiny_preset: Path, tmp_path: Path) -> None:
    path = tmp_path / "p4.json"
    Placement(num_ranks=4, num_nodes=1, layers=[1, 2], num_logical=16,
              phy2log=[list(range(16)), list(range(16))]).save(path)
    with pytest.raises(RoutedError, match="4 ranks"):
        LLMEngine.from_pretrained(tiny_preset, "fp32", EngineConfig(ep=2, placement=str(path)), progress=False)


def test_dead_rank_fails_the_request_with_a_clear_error(tiny_preset: Path) -> None:
    llm = LLM(tiny_preset, "fp32", progress=False, engine_config=EngineConfig(ep=2))
    try:
        worker = llm.engine.model.ep_group.procs[0]
        worker.kill()
        worker.wait()
        start = time.monotonic()
        with pytest.raises(RankFailed, match="rank 1"):
            llm.generate_ids(PROMPTS, GREEDY)
        assert time.monotonic() - start < 10
    finally:
        llm.close()


def test_hung_rank_times_out_instead_of_hanging(tiny_preset: Path) -> None:
    llm = LLM(tiny_preset, "fp32", progress=False, engine_config=EngineConfig(ep=2, ep_timeout_s=3))
    worker = llm.engine.model.ep_group.procs[0]
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RankFailed, match="hung|died"):
            llm.generate_ids(PROMPTS, GREEDY)
        assert time.monotonic() - start < 30
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        worker.kill()
        llm.close()


def test_server_reports_a_dead_rank_and_fails_requests(tiny_preset: Path) -> None:
    from test_server import KEY, Server

    srv = Server(tiny_preset, "--api-key", KEY, "--dtype", "fp32", "--ep", "2", "--max-model-len", "256")
    try:
        client = srv.client()
        reply = client.chat.completions.create(model=tiny_preset.name, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens == 4
        health = httpx.get(f"{srv.url}/health").json()
        assert [r["rank"] for r in health["ranks"]] == [0, 1]
        routing = httpx.get(f"{srv.url}/v1/routing", headers={"Authorization": f"Bearer {KEY}"}).json()
        pairs = [r["expert_pairs"] for r in routing["ranks"]]  # per-rank load in the routing telemetry
        assert sum(pairs) == 2 * 4 * (reply.usage.total_tokens - 1) and min(pairs) > 0  # tokens x top-4 x 2 MoE layers
        assert srv.metric('routed_ep_rank_alive{rank="1"}') == 1.0
        os.kill(health["ranks"][1]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while httpx.get(f"{srv.url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        response = httpx.get(f"{srv.url}/health")
        assert response.status_code == 503 and "rank 1" in response.json()["error"]
        failed = httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": tiny_preset.name, "prompt": "hello", "max_tokens": 4})
        assert failed.status_code == 503 and "rank 1" in failed.json()["error"]["message"]
    finally:
        assert srv.stop() == 0
