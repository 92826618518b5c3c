"""Expert placement (EPLB): which experts get extra replicas, and which rank holds each physical expert slot.

Input: a load per logical expert per MoE layer (token counts from a routing recording). Output: a `Placement`,
plain data the engine loads: per layer, `phy2log[p]` is the logical expert held in physical slot p, and rank r
holds slots [r*S, (r+1)*S), S = slots_per_rank, the same on every rank. An expert with n replicas is predicted
to send load/n to each (the engine splits its tokens evenly over the replicas, round-robin by token).

The policy is DeepSeek's EPLB (github.com/deepseek-ai/EPLB), written afresh:
  1. replicate: each of the `redundant` extra slots goes, one at a time, to the expert with the highest load
     per replica; also tried with at most one replica per rank (more puts two on one rank, which then carries
     a double share: 5 replicas of a hot expert on 4 ranks are worse than 4), and the better packing kept;
  2. pack: physical experts onto ranks, the same number per rank, heaviest first onto the lightest rank
     that has room (greedy LPT), then pairwise swaps out of the heaviest rank while they lower it;
  hierarchical, when nodes > 1 and nodes divide n_group: pack expert groups onto nodes first (the same
  packing, with group loads), then replicate and pack within each node, so a token's group-limited routing
  (topk_group) keeps its traffic inside few nodes. Otherwise placement is flat over all ranks.
Where the search space is small (few slots per layer), the greedy answer is only the starting bound of an
exact branch-and-bound over every replica choice and every equal-size packing, so small cases are optimal
(tests/test_eplb.py checks them against brute force). The greedy is not: loads 3,3,2,2,2,0 on two ranks
pack 3+2+2 | 3+2+0 = 7 | 5, and no single swap helps, where 3+3+0 | 2+2+2 = 6 | 6.

Legend: L MoE layers, E logical experts, P physical slots (E + redundant), G ranks, S = P / G, M nodes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any, Sequence

import torch

from routed.errors import RoutedError

FORMAT = "routed-eplb"
VERSION = 1
# Exact search only where (replica choices) x (equal-size packings) is at most this many; ~0.1 s per layer.
EXACT_SEARCH_LIMIT = 20_000


@dataclass
class Placement:
    num_ranks: int
    num_nodes: int
    layers: list[int]  # model layer indices of the MoE layers, in order
    num_logical: int  # routed experts per layer (n_routed_experts)
    phy2log: list[list[int]]  # [L][P]: logical expert id of each physical slot; rank r holds [r*S, (r+1)*S)
    policy: str = "balanced"  # "contiguous" | "flat" | "hierarchical": how it was made (informational)

    def __post_init__(self) -> None:
        _check_placement(self)

    @property
    def slots_per_rank(self) -> int:
        return len(self.phy2log[0]) // self.num_ranks

    @property
    def num_physical(self) -> int:
        return len(self.phy2log[0])

    def rank_slots(self, layer_index: int, rank: int) -> list[int]:
        """Logical expert ids held by `rank` in MoE layer `layer_index` (a position in `layers`), slot order."""
        s = self.slots_per_rank
        return self.phy2log[layer_index][rank * s : (rank + 1) * s]

    def replicas(self, layer_index: int) -> list[list[int]]:
        """Per logical expert: the physical slot ids holding it (ascending; at least one each)."""
        out: list[list[int]] = [[] for _ in range(self.num_logical)]
        for slot, e in enumerate(self.phy2log[layer_index]):
            out[e].append(slot)
        return out

    def phy2log_LP(self) -> torch.Tensor:
        return torch.tensor(self.phy2log, dtype=torch.long)

    def log2phy_LER(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [L, E, R_max] padded with -1, replica counts [L, E]): the lookup a router-side split needs."""
        reps = [self.replicas(i) for i in range(len(self.layers))]
        width = max(len(r) for layer in reps for r in layer)
        out = torch.full((len(reps), self.num_logical, width), -1, dtype=torch.long)
        for i, layer in enumerate(reps):
            for e, slots in enumerate(layer):
                out[i, e, : len(slots)] = torch.tensor(slots)
        return out, (out >= 0).sum(-1)

    def rank_loads(self, load_LE: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """Predicted load per rank [L, G] (float64): each expert's load split evenly over its replicas."""
        load = _as_load(load_LE)
        if tuple(load.shape) != (len(self.layers), self.num_logical):
            raise RoutedError(f"load has shape {tuple(load.shape)}; this placement is for "
                              f"{len(self.layers)} layers x {self.num_logical} experts")
        phy_LP = self.phy2log_LP()
        count_LE = torch.zeros_like(load).scatter_add_(1, phy_LP, torch.ones_like(phy_LP, dtype=load.dtype))
        slot_LP = load.gather(1, phy_LP) / count_LE.gather(1, phy_LP)
        return slot_LP.view(len(self.layers), self.num_ranks, self.slots_per_rank).sum(-1)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "policy": self.policy, "num_ranks": self.num_ranks,
                "num_nodes": self.num_nodes, "slots_per_rank": self.slots_per_rank, "num_logical": self.num_logical,
                "layers": self.layers, "phy2log": self.phy2log}

    def save(self, path: str | Path) -> None:
        """JSON, one line per layer of phy2log."""
        head = {k: v for k, v in self.to_dict().items() if k != "phy2log"}
        rows = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in self.phy2log)
        text = json.dumps(head)[:-1] + ',\n "phy2log": [\n  ' + rows + "\n]}\n"
        try:
            Path(path).write_text(text)
        except OSError as e:
            raise RoutedError(f"{path}: cannot write the placement ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as e:
            raise RoutedError(f"{path}: cannot read the placement ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RoutedError(f"{path}: not a placement file (not JSON: {e})") from None
        try:
            return cls.from_dict(raw)
        except RoutedError as e:
            raise RoutedError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: Any) -> Placement:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise RoutedError(f'not a placement file (expected a JSON object with "format": "{FORMAT}")')
        if raw.get("version") != VERSION:
            raise RoutedError(f"placement format version {raw.get('version')!r}; this routed reads {VERSION}")
        missing = [k for k in ("num_ranks", "num_nodes", "layers", "num_logical", "phy2log") if k not in raw]
        if missing:
            raise RoutedError(f"placement file lacks {', '.join(missing)}")
        p = cls(raw["num_ranks"], raw["num_nodes"], raw["layers"], raw["num_logical"], raw["phy2log"],
                raw.get("policy", "balanced"))
        if "slots_per_rank" in raw and raw["slots_per_rank"] != p.slots_per_rank:
            raise RoutedError(f"slots_per_rank is {raw['slots_per_rank']!r} but phy2log has {p.slots_per_rank}")
        return p


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_placement(p: Placement) -> None:
    for name in ("num_ranks", "num_nodes", "num_logical"):
        v = getattr(p, name)
        if not _is_int(v) or v < 1:
            raise RoutedError(f"{name} is {v!r}; expected a positive integer")
    if p.num_ranks % p.num_nodes:
        raise RoutedError(f"{p.num_ranks} ranks do not split evenly over {p.num_nodes} nodes")
    if not isinstance(p.layers, list) or not p.layers or not all(_is_int(x) for x in p.layers):
        raise RoutedError(f"layers is {p.layers!r}; expected a non-empty list of layer indices")
    if not isinstance(p.phy2log, list) or len(p.phy2log) != len(p.layers):
        n = len(p.phy2log) if isinstance(p.phy2log, list) else "no"
        raise RoutedError(f"phy2log has {n} rows for {len(p.layers)} layers")
    width = len(p.phy2log[0]) if isinstance(p.phy2log[0], list) else -1
    for i, row in enumerate(p.phy2log):
        if not isinstance(row, list) or len(row) != width or not all(_is_int(e) for e in row):
            raise RoutedError(f"phy2log row {i} is not a list of {width} integer expert ids like row 0")
        if width < p.num_logical or width % p.num_ranks:
            raise RoutedError(f"phy2log rows have {width} slots; need at least num_logical ({p.num_logical}) "
                              f"and a multiple of num_ranks ({p.num_ranks})")
        bad = [e for e in row if not 0 <= e < p.num_logical]
        if bad:
            raise RoutedError(f"phy2log row {i} holds expert id {bad[0]}, outside 0..{p.num_logical - 1}")
        absent = sorted(set(range(p.num_logical)) - set(row))
        if absent:
            raise RoutedError(f"phy2log row {i} places no replica of expert {absent[0]}; every expert needs one")


def _as_load(load_LE: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    load = torch.as_tensor(load_LE).detach().to("cpu", torch.float64)
    if load.ndim != 2 or load.shape[0] == 0 or load.shape[1] == 0:
        raise RoutedError(f"load must be [MoE layers, experts]; got shape {tuple(load.shape)}")
    if not torch.isfinite(load).all() or (load < 0).any():
        raise RoutedError("load must be finite and non-negative (token counts per expert)")
    return load


def imbalance(rank_loads: torch.Tensor) -> torch.Tensor:
    """max / mean rank load per layer [L]; 1.0 is perfect balance (and a layer with no load)."""
    rl = torch.as_tensor(rank_loads, dtype=torch.float64)
    mean = rl.mean(-1)
    return torch.where(mean > 0, rl.amax(-1) / mean.clamp(min=1e-300), torch.ones_like(mean))


def contiguous_placement(num_logical: int, num_layers: int, num_ranks: int, layers: list[int] | None = None,
                         num_nodes: int = 1) -> Placement:
    """The naive expert-parallel layout: rank r holds experts [r*E/G, (r+1)*E/G), no replicas."""
    if num_ranks < 1 or num_logical % num_ranks:
        raise RoutedError(f"{num_logical} experts do not split evenly over {num_ranks} ranks")
    layers = list(range(num_layers)) if layers is None else list(layers)
    return Placement(num_ranks, num_nodes, layers, num_logical, [list(range(num_logical)) for _ in layers],
                     "contiguous")


def balanced_placement(load_LE: torch.Tensor | Sequence[Sequence[float]], num_ranks: int, num_nodes: int = 1,
                       redundant: int = 0, n_group: int = 1, layers: list[int] | None = None) -> Placement:
    """EPLB: `redundant` extra replicas per layer and a packing whose heaviest rank is close to the mean."""
    load = _as_load(load_LE)
    L, E = load.shape
    if not all(_is_int(v) for v in (num_ranks, num_nodes, redundant, n_group)):
        raise RoutedError("num_ranks, num_nodes, redundant and n_group must be integers")
    if num_ranks < 1 or num_nodes < 1 or n_group < 1 or redundant < 0:
        raise RoutedError(f"need ranks >= 1, nodes >= 1, n_group >= 1, redundant >= 0; got ranks {num_ranks}, "
                          f"nodes {num_nodes}, n_group {n_group}, redundant {redundant}")
    if num_ranks % num_nodes:
        raise RoutedError(f"{num_ranks} ranks do not split evenly over {num_nodes} nodes")
    if (E + redundant) % num_ranks:
        raise RoutedError(f"{E} experts + {redundant} redundant = {E + redundant} slots do not split evenly over "
                          f"{num_ranks} ranks; choose redundant so the sum is a multiple of the rank count")
    if E % n_group:
        raise RoutedError(f"n_group {n_group} does not divide the {E} experts per layer")
    layers = list(range(L)) if layers is None else list(layers)
    if len(layers) != L:
        raise RoutedError(f"{len(layers)} layer indices for a load of {L} layers")
    hierarchical = num_nodes > 1 and n_group % num_nodes == 0
    phy2log = []
    for row in load.tolist():
        if hierarchical:
            phy2log.append(_place_hierarchical(row, E + redundant, n_group, num_nodes, num_ranks))
        else:
            phy2log.append(_place_flat(row, E + redundant, num_ranks))
    return Placement(num_ranks, num_nodes, layers, E, phy2log, "hierarchical" if hierarchical else "flat")


# ---- one layer ---------------------------------------------------------------------------------------------
def _place_hierarchical(load: list[float], num_phy: int, n_group: int, num_nodes: int, num_ranks: int) -> list[int]:
    """Groups onto nodes, then replicate and pack inside each node; node n holds ranks [n*G/M, (n+1)*G/M)."""
    size = len(load) // n_group
    group_load = [sum(load[g * size : (g + 1) * size]) for g in range(n_group)]
    node_of_group = _pack(group_load, num_nodes)
    out: list[int] = []
    for node in range(num_nodes):
        experts = [e for g in range(n_group) if node_of_group[g] == node for e in range(g * size, (g + 1) * size)]
        local = _place_flat([load[e] for e in experts], num_phy // num_nodes, num_ranks // num_nodes)
        out += [experts[i] for i in local]
    return out


def _place_flat(load: list[float], num_phy: int, num_ranks: int) -> list[int]:
    """phy2log of one layer (local expert ids): replicas chosen and packed, rank-major, ascending within a rank."""
    best = math.inf
    for cap in (num_ranks, num_phy):  # replicas capped at one per rank, and DeepSeek's uncapped greedy
        its, ws = _items(load, _replicate(load, num_phy, cap))
        found = _pack(ws, num_ranks, its)
        if _max_pack(ws, found, num_ranks) < best:
            items, weights, pack, best = its, ws, found, _max_pack(ws, found, num_ranks)
    redundant, size = num_phy - len(load), num_phy // num_ranks
    if redundant and math.comb(len(load) - 1 + redundant, redundant) * _packings(num_phy, num_ranks) \
            <= EXACT_SEARCH_LIMIT:
        total, tol = sum(load), _tol(load)
        for extra in combinations_with_replacement(range(len(load)), redundant):
            c = [1] * len(load)
            for e in extra:
                c[e] += 1
            its, ws = _items(load, c)
            if max(max(ws), total / num_ranks) >= best - tol:
                continue
            found = _pack_exact(ws, num_ranks, size, best, tol)
            if found is not None:
                items, weights, pack = its, ws, found
                best = _max_pack(ws, found, num_ranks)
    return [e for r in range(num_ranks) for e in sorted(items[i] for i in range(num_phy) if pack[i] == r)]


def _replicate(load: list[float], num_phy: int, cap: int) -> list[int]:
    """Replica count per expert: one each, then each extra to the highest load per replica (ties: fewer
    replicas, then lower id) among experts below `cap` replicas, or among all once every expert is at it."""
    counts = [1] * len(load)
    for _ in range(num_phy - len(load)):
        open_ = [i for i in range(len(load)) if counts[i] < cap] or range(len(load))
        e = max(open_, key=lambda i: (load[i] / counts[i], -counts[i], -i))
        counts[e] += 1
    return counts


def _items(load: list[float], counts: list[int]) -> tuple[list[int], list[float]]:
    items = [e for e, c in enumerate(counts) for _ in range(c)]
    return items, [load[e] / counts[e] for e in items]


def _tol(weights: list[float]) -> float:
    return 1e-9 * max(sum(weights), 1.0)


def _packings(n: int, packs: int) -> int:
    """Ways to split n items into `packs` unlabelled packs of n/packs items each."""
    size = n // packs
    return math.factorial(n) // (math.factorial(size) ** packs * math.factorial(packs))


def _max_pack(weights: list[float], pack: list[int], num_packs: int) -> float:
    loads = [0.0] * num_packs
    for w, p in zip(weights, pack):
        loads[p] += w
    return max(loads)


def _pack(weights: list[float], num_packs: int, labels: list[int] | None = None) -> list[int]:
    """Pack index of each item, len(weights)/num_packs items per pack, minimising the heaviest pack: exact
    where the packings are few, else greedy LPT refined by swaps. The greedy keeps items with the same label
    (replicas of one expert) in different packs where there is room: two on one rank only waste a slot."""
    pack = _pack_lpt(weights, num_packs, labels or list(range(len(weights))))
    size = len(weights) // num_packs
    if num_packs > 1 and _packings(len(weights), num_packs) <= EXACT_SEARCH_LIMIT:
        exact = _pack_exact(weights, num_packs, size, _max_pack(weights, pack, num_packs), _tol(weights))
        pack = exact if exact is not None else pack
    return pack


def _pack_lpt(weights: list[float], num_packs: int, labels: list[int]) -> list[int]:
    size = len(weights) // num_packs
    loads, counts, pack = [0.0] * num_packs, [0] * num_packs, [0] * len(weights)
    held: list[set[int]] = [set() for _ in range(num_packs)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        p = min((p for p in range(num_packs) if counts[p] < size), key=lambda p: (labels[i] in held[p], loads[p], p))
        pack[i], loads[p], counts[p] = p, loads[p] + weights[i], counts[p] + 1
        held[p].add(labels[i])
    return _refine(weights, pack, num_packs, labels) if num_packs > 1 else pack


def _refine(weights: list[float], pack: list[int], num_packs: int, labels: list[int]) -> list[int]:
    """Swap one item of the heaviest pack with a lighter item of another pack while that lowers the heaviest
    pack and leaves the other below its old load, and puts no label twice in a pack. Each swap lowers the
    sorted load vector, so it stops."""
    w = torch.tensor(weights, dtype=torch.float64)
    lab = torch.tensor(labels)
    slots_GS = torch.tensor(pack).argsort(stable=True).view(num_packs, -1)  # item ids per pack
    tol = _tol(weights)
    for _ in range(4 * len(weights)):
        w_GS, lab_GS = w[slots_GS], lab[slots_GS]
        loads_G = w_GS.sum(-1)
        h = int(loads_G.argmax())
        delta_GSS = w_GS[h][None, :, None] - w_GS[:, None, :]  # [other pack, item of h, item of other]
        worse_GSS = torch.maximum(loads_G[h] - delta_GSS, loads_G[:, None, None] + delta_GSS)
        held_GL = torch.zeros(num_packs, int(lab.max()) + 1, dtype=torch.bool).scatter_(1, lab_GS, True)
        into_other = held_GL[:, lab_GS[h]][:, :, None]  # h's item would join a pack that holds its label
        into_h = held_GL[h][lab_GS][:, None, :]  # the other's item would join h, which holds its label
        same = lab_GS[h][None, :, None] == lab_GS[:, None, :]
        worse_GSS[(into_other | into_h) & ~same] = math.inf
        worse_GSS[h] = math.inf
        best = int(worse_GSS.argmin())
        if float(worse_GSS.view(-1)[best]) >= float(loads_G[h]) - tol:
            break
        g, a, b = best // (w_GS.shape[1] ** 2), best // w_GS.shape[1] % w_GS.shape[1], best % w_GS.shape[1]
        slots_GS[h, a], slots_GS[g, b] = int(slots_GS[g, b]), int(slots_GS[h, a])
    out = [0] * len(weights)
    for p, row in enumerate(slots_GS.tolist()):
        for i in row:
            out[i] = p
    return out


def _pack_exact(weights: list[float], num_packs: int, size: int, bound: float, tol: float) -> list[int] | None:
    """Branch and bound: a packing whose heaviest pack is below `bound - tol`, the lowest there is, or None."""
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    if bound <= max(max(weights), sum(weights) / num_packs) + tol:
        return None  # the bound is already the lower bound
    loads, counts, pack = [0.0] * num_packs, [0] * num_packs, [0] * len(weights)
    best: list[Any] = [bound, None]

    def dfs(k: int, heaviest: float) -> None:
        if k == len(order):
            best[0], best[1] = heaviest, list(pack)
            return
        i, tried = order[k], set()
        for p in range(num_packs):
            state = (loads[p], counts[p])
            if counts[p] == size or state in tried:  # packs in the same state are interchangeable
                continue
            tried.add(state)
            new = loads[p] + weights[i]
            if new >= best[0] - tol:
                continue
            loads[p], counts[p], pack[i] = new, counts[p] + 1, p
            dfs(k + 1, max(heaviest, new))
            loads[p], counts[p] = state

    dfs(0, 0.0)
    return best[1]
