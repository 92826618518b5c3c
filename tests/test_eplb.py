"""routed.parallel.eplb: replica choice and packing (against brute force), hierarchy, the file, `routed eplb`."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from routed.cli import main
from routed.errors import RoutedError
from routed.parallel.eplb import (
    Placement,
    balanced_placement,
    contiguous_placement,
    imbalance,
)
from routed.telemetry import Recording


def zipf_load(layers: int, experts: int, seed: int, s: float = 1.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [(1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** s)[torch.randperm(experts, generator=g)]
            for _ in range(layers)]
    return (torch.stack(rows) * 10_000).round()


def check_structure(p: Placement, experts: int, ranks: int, redundant: int) -> None:
    for i in range(len(p.layers)):
        assert len(p.phy2log[i]) == experts + redundant == ranks * p.slots_per_rank
        assert sorted(set(p.phy2log[i])) == list(range(experts))


# ---- brute force -------------------------------------------------------------------------------------------
def brute_force_max(load: list[float], ranks: int, redundant: int) -> float:
    """Lowest heaviest-rank load over every replica choice and every split into equal-size ranks."""
    best = float("inf")
    P = len(load) + redundant
    S = P // ranks
    for extra in itertools.combinations_with_replacement(range(len(load)), redundant):
        count = [1 + extra.count(e) for e in range(len(load))]
        w = [load[e] / count[e] for e in range(len(load)) for _ in range(count[e])]

        def split(rest: list[int], heaviest: float) -> None:
            nonlocal best
            if not rest:
                best = min(best, heaviest)
                return
            first, others = rest[0], rest[1:]  # the rank holding the first remaining item: fixes rank order
            for mates in itertools.combinations(others, S - 1):
                left = [i for i in others if i not in mates]
                split(left, max(heaviest, w[first] + sum(w[i] for i in mates)))

        split(list(range(P)), 0.0)
    return best


CASES = [(6, 2, 0), (6, 3, 0), (8, 2, 0), (6, 2, 2), (7, 3, 2), (8, 3, 1), (8, 2, 2), (6, 4, 2)]


@pytest.mark.parametrize("experts, ranks, redundant", CASES)
def test_balanced_matches_brute_force_on_small_cases(experts: int, ranks: int, redundant: int) -> None:
    rng = random.Random(experts * 100 + ranks * 10 + redundant)
    loads = [[float(rng.choice([0, 1, 2, 3, 5, 8, 13, 40])) for _ in range(experts)] for _ in range(4)]
    loads.append([float(rng.randint(1, 100)) for _ in range(experts)])
    p = balanced_placement(torch.tensor(loads), ranks, redundant=redundant)
    check_structure(p, experts, ranks, redundant)
    got = p.rank_loads(torch.tensor(loads)).amax(-1).tolist()
    for i, load in enumerate(loads):
        assert got[i] == pytest.approx(brute_force_max(load, ranks, redundant), rel=1e-12), (load, p.phy2log[i])


def test_the_case_greedy_gets_wrong_is_solved() -> None:
    """LPT plus swaps gives 3+2+2 | 3+2+0 = 7; the optimum is 3+3+0 | 2+2+2 = 6."""
    load = torch.tensor([[3.0, 3.0, 2.0, 2.0, 2.0, 0.0]])
    p = balanced_placement(load, 2)
    assert p.rank_loads(load).tolist() == [[6.0, 6.0]]


# ---- large cases: better than contiguous, replicas share the load ------------------------------------------
def test_balanced_beats_contiguous_on_a_skewed_load() -> None:
    load = zipf_load(4, 64, seed=0)
    naive = imbalance(contiguous_placement(64, 4, 8).rank_loads(load))
    flat = balanced_placement(load, 8)
    replicated = balanced_placement(load, 8, redundant=16)
    check_structure(flat, 64, 8, 0)
    check_structure(replicated, 64, 8, 16)
    assert (imbalance(flat.rank_loads(load)) < naive).all()
    assert (imbalance(replicated.rank_loads(load)) < imbalance(flat.rank_loads(load))).all()
    assert (imbalance(replicated.rank_loads(load)) < 1.05).all()  # naive is ~1.5-3 on this load
    assert naive.min() > 1.3
    S = replicated.slots_per_rank
    for row in replicated.phy2log:  # replicas of one expert on different ranks
        assert all(len(set(row[r * S : (r + 1) * S])) == S for r in range(8))


def test_the_hot_expert_gets_replicas_and_they_share_its_load() -> None:
    load = torch.ones(1, 16) * 10
    load[0, 5] = 400.0  # 400 of 550 tokens: no packing without replicas gets below 400 on a rank
    p = balanced_placement(load, 4, redundant=4)
    reps = p.replicas(0)
    # four replicas, one per rank, and the fifth extra slot splits a cold expert: 100 + 10+10+10+10 on the
    # heaviest rank; greedy's fifth replica of the hot one would put 160 + 30 on one rank.
    assert len(reps[5]) == 4 and {s // p.slots_per_rank for s in reps[5]} == {0, 1, 2, 3}
    assert sorted(len(r) for r in reps) == [1] * 14 + [2, 4]
    rl = p.rank_loads(load)
    assert float(rl.sum()) == pytest.approx(float(load.sum()))
    assert float(rl.max()) == 140.0
    assert float(imbalance(rl)[0]) < float(imbalance(balanced_placement(load, 4).rank_loads(load))[0])
    slots, counts = p.log2phy_LER()
    assert counts[0, 5] == 4 and slots[0, 5].tolist() == reps[5] and slots[0, 0].tolist() == reps[0] + [-1] * (4 - len(reps[0]))


def test_rank_loads_split_each_expert_evenly_over_its_replicas() -> None:
    p = Placement(2, 1, [3], 3, [[0, 1, 0, 2]])  # expert 0 on both ranks
    assert p.rank_slots(0, 0) == [0, 1] and p.rank_slots(0, 1) == [0, 2]
    assert p.replicas(0) == [[0, 2], [1], [3]]
    assert p.rank_loads([[10.0, 4.0, 6.0]]).tolist() == [[9.0, 11.0]]
    assert imbalance(torch.tensor([[9.0, 11.0], [0.0, 0.0]])).tolist() == [1.1, 1.0]


def test_hierarchical_keeps_each_groups_experts_on_one_node() -> None:
    load = zipf_load(3, 32, seed=1)
    p = balanced_placement(load, 8, num_nodes=2, redundant=8, n_group=8)
    assert p.policy == "hierarchical"
    check_structure(p, 32, 8, 8)
    per_node = p.num_physical // 2
    for i in range(3):
        groups_on = [set() for _ in range(2)]
        for slot, e in enumerate(p.phy2log[i]):
            groups_on[slot // per_node].add(e // 4)
        assert not groups_on[0] & groups_on[1] and len(groups_on[0]) == len(groups_on[1]) == 4
    assert (imbalance(p.rank_loads(load)) < imbalance(contiguous_placement(32, 3, 8).rank_loads(load))).all()


def test_nodes_that_do_not_divide_the_groups_fall_back_to_flat() -> None:
    p = balanced_placement(zipf_load(1, 24, seed=2), 4, num_nodes=2, n_group=3)
    assert p.policy == "flat"


def test_deepseek_v3_shape_flat_and_hierarchical() -> None:
    """256 experts + 32 redundant on 32 ranks: flat is near perfect; hierarchical (8 groups on 4 nodes) is as
    good as the best split of the groups over the nodes allows, and near perfect inside each node."""
    load = zipf_load(3, 256, seed=3, s=0.8)
    flat = balanced_placement(load, 32, redundant=32)
    check_structure(flat, 256, 32, 32)
    assert (imbalance(flat.rank_loads(load)) < 1.01).all()
    hier = balanced_placement(load, 32, num_nodes=4, redundant=32, n_group=8)
    check_structure(hier, 256, 32, 32)
    rl_LMR = hier.rank_loads(load).view(3, 4, 8)
    assert (imbalance(rl_LMR.flatten(0, 1)) < 1.01).all()  # within each node
    group_LG = load.view(3, 8, 32).sum(-1)
    best_node = [min(max(row[list(pair)].sum() for pair in pairs) for pairs in pairings(list(range(8))))
                 for row in group_LG]
    assert rl_LMR.sum(-1).amax(-1).tolist() == pytest.approx([float(b) for b in best_node])


def pairings(items: list[int]) -> list[list[tuple[int, int]]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    return [[(first, m), *p] for m in rest for p in pairings([i for i in rest if i != m])]


def test_contiguous_placement_is_blocks() -> None:
    p = contiguous_placement(8, 2, 4, layers=[1, 2])
    assert p.rank_slots(1, 2) == [4, 5] and p.layers == [1, 2] and p.policy == "contiguous"
    with pytest.raises(RoutedError, match="do not split evenly"):
        contiguous_placement(6, 1, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_ranks=3), "do not split evenly over 3 ranks"),
    (dict(num_ranks=4, redundant=2), "18 slots do not split evenly"),
    (dict(num_ranks=4, num_nodes=3), "4 ranks do not split evenly over 3 nodes"),
    (dict(num_ranks=4, n_group=5), "n_group 5 does not divide"),
    (dict(num_ranks=4, redundant=-4), "redundant >= 0"),
    (dict(num_ranks=4, layers=[1, 2, 3]), "3 layer indices for a load of 2 layers"),
])
def test_bad_arguments_say_what_is_wrong(kwargs: dict, match: str) -> None:
    with pytest.raises(RoutedError, match=match):
        balanced_placement(torch.ones(2, 16), **kwargs)


def test_bad_load_is_refused() -> None:
    with pytest.raises(RoutedError, match="non-negative"):
        balanced_placement(-torch.ones(1, 4), 2)
    with pytest.raises(RoutedError, match="shape"):
        balanced_placement(torch.ones(4), 2)


# ---- the file ----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    p = balanced_placement(zipf_load(2, 16, seed=4), 4, num_nodes=2, redundant=4, n_group=4, layers=[1, 3])
    p.save(tmp_path / "p.json")
    q = Placement.load(tmp_path / "p.json")
    assert q == p and q.slots_per_rank == 5
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "routed-eplb"


@pytest.mark.parametrize("text, match", [
    ("not json", "not JSON"),
    ('{"a": 1}', "not a placement file"),
    ('{"format": "routed-eplb", "version": 1, "num_ranks": 2}', "lacks num_nodes, layers, num_logical, phy2log"),
    ('{"format": "routed-eplb", "version": 1, "num_ranks": 2, "num_nodes": 1, "layers": [1], "num_logical": 2, '
     '"phy2log": [[0, 2]]}', "expert id 2"),
    ('{"format": "routed-eplb", "version": 1, "num_ranks": 2, "num_nodes": 1, "layers": [1], "num_logical": 2, '
     '"phy2log": [[0, 0]]}', "no replica of expert 1"),
    ('{"format": "routed-eplb", "version": 1, "num_ranks": 2, "num_nodes": 1, "layers": [1], "num_logical": 3, '
     '"phy2log": [[0, 1, 2]]}', "multiple of num_ranks"),
    ('{"format": "routed-eplb", "version": 1, "num_ranks": 1, "num_nodes": 1, "layers": [1, 2], '
     '"num_logical": 2, "phy2log": [[0, 1]]}', "1 rows for 2 layers"),
    ('{"format": "routed-eplb", "version": 2}', "version 2"),
])
def test_bad_placement_file_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(RoutedError, match=match) as e:
        Placement.load(tmp_path / "p.json")
    assert str(e.value).startswith(str(tmp_path / "p.json"))
    with pytest.raises(RoutedError, match="cannot read"):
        Placement.load(tmp_path / "missing.json")


# ---- `routed eplb` -----------------------------------------------------------------------------------------
@pytest.fixture
def recording(tmp_path: Path) -> Path:
    counts_TLE = torch.stack([zipf_load(2, 16, seed=t).long() for t in range(3)])
    path = tmp_path / "rec.safetensors"
    Recording(counts_TLE, torch.full((3,), 100), torch.arange(3, dtype=torch.float64), [1, 2], 4).save(path)
    return path


def test_cli_writes_a_placement_and_prints_the_comparison(recording: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "placement.json"
    assert main(["eplb", "--recording", str(recording), "--ranks", "4", "--redundant", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "contiguous" in text and "balanced" in text and "worst" in text
    p = Placement.load(out)
    assert p.layers == [1, 2] and p.num_ranks == 4 and p.slots_per_rank == 5

    assert main(["eplb", "--recording", str(recording), "--ranks", "4", "--nodes", "2", "--n-group", "4",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["policy"] == "hierarchical" and len(d["layers"]) == 2
    assert d["summary"]["balanced"]["mean"] <= d["summary"]["contiguous"]["mean"]


def test_cli_reads_n_group_from_the_model(recording: Path, tmp_path: Path, capsys) -> None:
    from routed.presets import PRESETS

    assert PRESETS["tiny"]["n_routed_experts"] == 16 and PRESETS["tiny"]["n_group"] == 4
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"]))
    assert main(["eplb", "--recording", str(recording), "--ranks", "4", "--nodes", "2", "--model", str(tmp_path),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_group"] == 4


@pytest.mark.parametrize("args, match", [
    (["--recording", "nope.safetensors", "--ranks", "4"], "not a routing recording"),
    (["--ranks", "3"], "do not split evenly over 3 ranks"),
    (["--ranks", "4", "--nodes", "3"], "4 ranks do not split evenly over 3 nodes"),
])
def test_cli_errors_are_one_line(recording: Path, capsys, args: list[str], match: str) -> None:
    if "--recording" not in args:
        args = ["--recording", str(recording), *args]
    assert main(["eplb", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("routed: error: ") and match in err and err.count("\n") == 1
