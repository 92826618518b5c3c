"""Expert parallelism on torch.distributed: routed experts sharded over ranks, everything else replicated.

Layout: rank 0 owns the scheduler, the sampler and the API; every rank holds the full non-expert weights
(attention, dense layers, shared experts, embedding) and its own copy of the paged latent cache, and the
routed experts of its physical slots. Each step rank 0 broadcasts the step's inputs (`send`), every rank
runs the same forward, and each MoE layer does:

    router (replicated, identical on every rank)
    -> each (token, choice) pair goes to one physical replica of its logical expert: replica
       (pair counter) mod (replicas of that expert), so replicas share their expert's tokens evenly
    -> the rank computes the pairs that landed on its slots, weighted, in fp32
    -> all_reduce(sum) over ranks -> + shared experts

One all_reduce of [tokens, hidden] fp32 per MoE layer: on one machine with replicated attention this is
simpler than all-to-all dispatch + combine and moves the same order of bytes for small batches (measured in
BENCHMARKS.md). gloo on CPU, nccl on GPU.

Process groups: the default group (timeout `timeout_s`) carries the step commands and the per-layer
all_reduce — a rank that hangs fails the step after `timeout_s`, a rank that dies breaks it at once; while
rank 0 is idle it broadcasts a heartbeat every `timeout_s / 4` so waiting workers do not time out. A second
group with a long timeout carries only the after-loading barrier (loading a large checkpoint takes minutes).

Launch: `--ep N` spawns ranks 1..N-1 on this machine (`launch`); under `torchrun` (RANK / WORLD_SIZE set)
every process runs the same command and ranks > 0 become workers (`run_worker`).
"""

from __future__ import annotations

import atexit
import logging
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from routed.errors import RoutedError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0


class RankFailed(RoutedError):
    """A rank of the expert-parallel group died, hung past the timeout, or failed to load."""


# ---- which rank holds which experts -------------------------------------------------------------------
def contiguous_slots(num_experts: int, world: int) -> list[int]:
    """The naive placement: rank r holds experts [r*E/world, (r+1)*E/world)."""
    if num_experts % world:
        raise RoutedError(f"{num_experts} routed experts do not split evenly over {world} ranks; "
                          f"use --placement with redundant experts to make them divide")
    return list(range(num_experts))


@dataclass(frozen=True)
class EPShard:
    """What one rank holds: per MoE layer, the logical expert of every physical slot (rank r holds slots
    [r*S, (r+1)*S)); layers absent from `phy2log` use the contiguous placement."""

    rank: int
    world: int
    phy2log: dict[int, list[int]] = field(default_factory=dict)

    def layer_slots(self, layer: int, num_experts: int) -> list[int]:
        slots = self.phy2log.get(layer) or contiguous_slots(num_experts, self.world)
        if max(slots) + 1 != num_experts:
            raise RoutedError(f"the placement places {max(slots) + 1} experts per layer but this checkpoint has "
                              f"{num_experts}; make it from a recording of this model")
        if len(slots) % self.world or sorted(set(slots)) != list(range(num_experts)):
            raise RoutedError(f"placement for layer {layer}: {len(slots)} slots over {self.world} ranks must "
                              f"divide evenly and hold every one of the {num_experts} experts")
        return slots

    @classmethod
    def from_placement(cls, rank: int, world: int, path: str | Path | None) -> EPShard:
        if path is None:
            return cls(rank, world)
        from routed.parallel.eplb import Placement

        placement = Placement.load(path)
        if placement.num_ranks != world:
            raise RoutedError(f"{path}: the placement is for {placement.num_ranks} ranks, not --ep {world}")
        return cls(rank, world, dict(zip(placement.layers, placement.phy2log)))


class ExpertParallel:
    """One MoE layer's dispatch and combine (see the module docstring). Holds device counters of the
    (token, choice) pairs each physical slot received — `slot_tokens` [P] — for the routing telemetry."""

    def __init__(self, phy2log: list[int], rank: int, world: int, num_experts: int) -> None:
        P = len(phy2log)
        self.rank, self.world, self.slots_per_rank = rank, world, P // world
        phy = torch.tensor(phy2log)
        self.replicas_E = torch.bincount(phy, minlength=num_experts)
        order = phy.argsort(stable=True)  # physical slots grouped by logical expert
        first = torch.cumsum(self.replicas_E, 0) - self.replicas_E
        rank_in_expert = torch.arange(P) - first[phy[order]]
        self.log2phy_ER = torch.full((num_experts, int(self.replicas_E.max())), -1, dtype=torch.long)
        self.log2phy_ER[phy[order], rank_in_expert] = order
        self.local = phy2log[rank * self.slots_per_rank : (rank + 1) * self.slots_per_rank]
        self.slot_tokens = torch.zeros(P, dtype=torch.long)
        self.seen_E = torch.zeros(num_experts, dtype=torch.long)  # pairs per expert so far: the round-robin

    def dispatch(self, ids_NK: torch.Tensor) -> torch.Tensor:
        """Logical expert ids -> this rank's slot index of each pair, or -1 where another rank computes it.
        An expert's pairs go round-robin over its replicas (a per-expert counter that every rank advances
        identically), so replicas split its load to within one pair."""
        flat = ids_NK.flatten()
        counts_E = torch.bincount(flat, minlength=self.seen_E.numel())
        order = flat.argsort(stable=True)
        nth = torch.empty_like(flat)  # how many earlier pairs of this step chose the same expert
        nth[order] = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts_E, 0) - counts_E)[flat[order]]
        replica = (self.seen_E[flat] + nth) % self.replicas_E[flat]
        self.seen_E += counts_E
        phys = self.log2phy_ER[flat, replica]
        self.slot_tokens += torch.bincount(phys, minlength=self.slot_tokens.numel())
        mine = phys // self.slots_per_rank == self.rank
        return torch.where(mine, phys % self.slots_per_rank, -1).view_as(ids_NK)

    def forward(self, experts: torch.nn.Module, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor,
                impl: str) -> torch.Tensor:
        local_NK = self.dispatch(ids_NK)
        n_idx, k_idx = (local_NK >= 0).nonzero(as_tuple=True)
        y_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        if n_idx.numel():
            y_M, _ = experts(x_ND[n_idx], local_NK[n_idx, k_idx, None], w_NK[n_idx, k_idx, None], impl,
                             out_dtype=torch.float32)
            y_ND.index_add_(0, n_idx, y_M)
        try:
            dist.all_reduce(y_ND)
        except (RuntimeError, dist.DistBackendError) as e:
            raise RankFailed(f"expert-parallel all_reduce failed (a rank died or hung): {_first_line(e)}") from None
        return y_ND.to(x_ND.dtype)

    def rank_tokens(self) -> torch.Tensor:
        """[world] pairs computed by each rank since the last reset."""
        return self.slot_tokens.view(self.world, self.slots_per_rank).sum(-1)


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split(". This is typically")[0][:300]  # gloo's advice to "check the logs" is noise here


# ---- process group and the step channel ---------------------------------------------------------------
class EPGroup:
    """Rank 0's side of the group: send each step's model call to the workers; watch spawned workers."""

    def __init__(self, world: int, load_group: Any, timeout_s: float, procs: list[Any] | None = None) -> None:
        self.world, self.load_group, self.procs = world, load_group, procs or []
        self.lock = threading.RLock()  # one collective sequence at a time: steps and heartbeats
        self.heartbeat_s = timeout_s / 4
        self.last_sent = time.monotonic()
        self.error: str | None = None
        self.closed = False
        self.started = False  # every rank loaded and entered its step loop
        self.threads_before: int | None = None  # rank 0's torch thread count before the launch
        if self.procs:
            threading.Thread(target=self._watch, daemon=True, name="ep-watchdog").start()
        atexit.register(self.close)

    def _watch(self) -> None:
        while not self.closed:
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None and not self.closed:
                    self.error = f"expert-parallel rank {rank} exited (code {p.returncode})"
                    log.error(self.error)
                    return
            time.sleep(0.2)

    def ranks(self, model: Any) -> list[dict[str, Any]]:
        """Per rank: pid (for ranks this process started), alive, and the (token, expert) pairs it has
        computed over the main model's MoE layers since the counters were last reset."""
        pairs = sum((ep.rank_tokens() for ep in model_eps(model)), torch.zeros(self.world, dtype=torch.long))
        out = [{"rank": 0, "pid": os.getpid(), "alive": True}]
        for rank in range(1, self.world):
            p = self.procs[rank - 1] if self.procs else None
            out.append({"rank": rank, "pid": p.pid if p else None,
                        "alive": (p.poll() is None) if p else self.error is None})
        for row, n in zip(out, pairs.tolist()):
            row["expert_pairs"] = n
        return out

    def check(self) -> None:
        if self.error:
            raise RankFailed(self.error)

    def diagnose(self, detail: str) -> RankFailed:
        """After a failed collective: name the rank that exited if this process started it."""
        if self.error is None:
            gone = [(rank, p.poll()) for rank, p in enumerate(self.procs, start=1) if p.poll() is not None]
            self.error = (f"expert-parallel rank {gone[0][0]} exited (code {gone[0][1]})" if gone else detail)
        return RankFailed(self.error)

    def start(self) -> None:
        """Every rank is in its step loop: keep idle workers fed with heartbeats."""
        self.started = True
        threading.Thread(target=self._heartbeat, daemon=True, name="ep-heartbeat").start()

    def _heartbeat(self) -> None:
        while not self.closed and self.error is None:
            time.sleep(self.heartbeat_s / 2)
            with self.lock:
                if self.closed or self.error or time.monotonic() - self.last_sent < self.heartbeat_s:
                    continue
                try:
                    self.send(("noop", (), None))
                except RankFailed as e:
                    log.error("%s", e)

    def send(self, message: Any) -> None:
        self.check()
        try:
            with self.lock:
                dist.broadcast_object_list([message], src=0)
                self.last_sent = time.monotonic()
        except (RuntimeError, dist.DistBackendError) as e:
            time.sleep(0.1)  # a dead worker's exit status may lag its closed socket
            raise self.diagnose(f"expert-parallel workers unreachable (a rank died or hung): {_first_line(e)}") from None

    def close(self) -> None:
        """Stop the workers (they leave their loop) and tear the group down."""
        if self.closed:
            return
        self.closed = True
        if self.started and not self.error:
            try:
                with self.lock:
                    dist.broadcast_object_list([None], src=0)
            except Exception:  # noqa: BLE001 — a worker already gone: nothing left to stop
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world) when launched by torchrun with more than one process, else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _init(rank: int, world: int, timeout_s: float, store: Any = None) -> Any:
    """Join the default group (the per-layer collectives) and make the step channel (idle is fine there)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {"store": store} if store is not None else {"init_method": "env://"}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
    return dist.new_group(backend="gloo", timeout=timedelta(days=1))  # the after-loading barrier


@dataclass(frozen=True)
class LoadSpec:
    """Everything a worker needs to load its shard of the model (sent to spawned workers as JSON)."""

    path: str
    dtype: str = "bf16"
    mtp: bool = False
    quant: str | None = None
    placement: str | None = None
    threads: int = 1


def _load_shard(spec: LoadSpec, rank: int, world: int, progress: bool) -> Any:
    from routed.loader import load_model

    shard = EPShard.from_placement(rank, world, spec.placement)
    return load_model(spec.path, spec.dtype, mtp=spec.mtp, quant=spec.quant, progress=progress, shard=shard)


# How long rank 0 waits for the workers it started to join, at least: a process starting Python and importing
# torch on a busy machine took over 3 s here, and a short step timeout (`--ep-timeout`) is for hung steps.
WORKER_START_S = 120.0


def launch(spec: LoadSpec, world: int, timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = True) -> Any:
    """Rank 0 on this machine: start ranks 1..world-1 (`python -m routed.parallel.worker`), join the group,
    load rank 0's shard. Under torchrun (RANK/WORLD_SIZE set) torchrun starts the other ranks instead."""
    env = torchrun_env()
    procs: list[subprocess.Popen] = []
    if env is not None:
        rank, world_env = env
        if rank != 0:
            raise RoutedError("launch() is rank 0's; ranks > 0 run run_worker()")
        if world not in (1, world_env):
            raise RoutedError(f"--ep {world} but torchrun started {world_env} processes; pass --ep {world_env}")
        world = world_env
        load_group = _init(0, world, timeout_s)
    else:
        if world < 2:
            raise RoutedError("--ep must be at least 2 for expert parallelism")
        start_s = max(timeout_s, WORKER_START_S)  # starting Python and importing torch is not a hang
        store = dist.TCPStore("127.0.0.1", 0, world, True, timedelta(seconds=start_s), wait_for_workers=False)
        for rank in range(1, world):
            job = json.dumps({"spec": asdict(spec), "rank": rank, "world": world, "port": store.port,
                              "timeout_s": timeout_s})
            procs.append(subprocess.Popen([sys.executable, "-m", "routed.parallel.worker", job]))
        threads_before = torch.get_num_threads()
        torch.set_num_threads(spec.threads)  # the ranks share this machine's cores; restored at close()
        _wait_for_workers(store, procs, start_s)
        load_group = _init(0, world, timeout_s, store)
    group = EPGroup(world, load_group, timeout_s, procs)
    group.threads_before = threads_before if env is None else None
    error, model = None, None
    try:
        model = _load_shard(spec, 0, world, progress)
    except Exception as e:  # noqa: BLE001 — the workers wait in the barrier for rank 0's word
        error = e
    try:
        _barrier(group, "loading the model", error)
    except BaseException:
        group.close()
        raise
    group.start()
    model.ep_group = group
    return model


def _wait_for_workers(store: Any, procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Until every worker has checked in; a worker that exits first fails the launch at once."""
    deadline = time.monotonic() + timeout_s
    keys = [f"routed/up/{rank}" for rank in range(1, len(procs) + 1)]
    while not store.check(keys):
        for rank, p in enumerate(procs, start=1):
            if p.poll() is not None:
                for q in procs:
                    q.kill()
                raise RankFailed(f"expert-parallel rank {rank} exited (code {p.returncode}) before joining; "
                                 f"its error is above")
        if time.monotonic() > deadline:
            for q in procs:
                q.kill()
            raise RankFailed(f"expert-parallel workers did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def _barrier(group: EPGroup, what: str, own_error: Exception | None) -> None:
    """Every rank says whether it loaded; any failure fails the launch (rank 0's own error as it is)."""
    try:
        results = _gather_load_errors(group.load_group, group.world, own_error)
    except (RuntimeError, dist.DistBackendError) as e:
        raise RankFailed(group.error or f"expert-parallel rank failed while {what}: {_first_line(e)}") from None
    if own_error is not None:
        raise own_error
    errors = [f"rank {r}: {err}" for r, err in enumerate(results) if err]
    if errors:
        raise RankFailed(f"expert-parallel ranks failed while {what}: " + "; ".join(errors))


def _gather_load_errors(load_group: Any, world: int, own_error: Exception | None) -> list[str | None]:
    """Every rank's loading error (None where it loaded), the same list on every rank."""
    results: list[Any] = [None] * world
    own = None if own_error is None else f"{type(own_error).__name__}: {_first_line(own_error)}"
    dist.all_gather_object(results, own, group=load_group)
    return results


def spawned_worker(job: dict[str, Any]) -> None:
    """A worker started by `launch` on this machine (routed.parallel.worker is its entry point)."""
    spec, rank, world = LoadSpec(**job["spec"]), job["rank"], job["world"]
    torch.set_num_threads(spec.threads)
    logging.basicConfig(level=logging.WARNING, format=f"routed rank {rank}: %(levelname)s %(message)s")
    store = dist.TCPStore("127.0.0.1", job["port"], world, False, timedelta(seconds=job["timeout_s"]))
    store.set(f"routed/up/{rank}", "1")
    load_group = _init(rank, world, job["timeout_s"], store)
    _serve(spec, rank, world, load_group)


def run_worker(spec: LoadSpec, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """A torchrun rank > 0: join the group, load this rank's shard, run steps until rank 0 stops."""
    env = torchrun_env()
    if env is None or env[0] == 0:
        raise RoutedError("run_worker() is for torchrun ranks > 0")
    load_group = _init(env[0], env[1], timeout_s)
    _serve(spec, env[0], env[1], load_group)
    return 0


def _serve(spec: LoadSpec, rank: int, world: int, load_group: Any) -> None:
    error, model = None, None
    try:
        model = _load_shard(spec, rank, world, progress=False)
    except Exception as e:  # noqa: BLE001 — reported to rank 0, which names it
        error = e
    if any(_gather_load_errors(load_group, world, error)):  # some rank (maybe rank 0) failed to load: the launch is off
        dist.destroy_process_group()
        return
    try:
        worker_loop(model)
    except (RuntimeError, dist.DistBackendError) as e:  # rank 0 went away or a peer died
        log.warning("leaving: %s", _first_line(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.inference_mode()
def worker_loop(model: Any) -> None:
    """Mirror rank 0's model calls: ("cache", slots) makes the latent cache; (method, args, batch fields)
    runs `model.method(*args, PagedBatch(cache, *fields))`; None stops."""
    from routed.model.attention import PagedBatch

    cache = None
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            return
        op, args, fields = message[0]
        if op == "noop":  # rank 0's heartbeat
            continue
        if op == "cache":
            cache = model.new_cache(*args)
        elif op == "set_impl":
            model.set_impl(*args)
        elif op == "reset_counters":
            for moe_ep in model_eps(model):
                moe_ep.slot_tokens.zero_()
        elif op in ("forward_hidden", "forward_mtp"):
            getattr(model, op)(*args, PagedBatch(cache, *fields) if fields is not None else None)
        else:
            raise RuntimeError(f"unknown expert-parallel op {op!r}")


def model_eps(model: Any) -> list[ExpertParallel]:
    """The ExpertParallel of every MoE layer of the main model, in order (MTP layers excluded)."""
    return [layer.mlp.ep for layer in model.model.layers if getattr(layer.mlp, "ep", None) is not None]
