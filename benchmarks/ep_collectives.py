"""The combine step of expert parallelism on this machine: gloo collectives between 2 local processes.

routed combines each MoE layer's partial outputs with one all_reduce of [tokens, hidden] fp32. This times it
against the two alternatives the issue names, moving the same result: all-gather of every rank's partial
output + a local sum, and all-to-all (each rank sends each other rank the slice of tokens that rank owns,
then reduces — what a data-parallel-attention layout would do, half the tokens per rank). Median of repeats.

    python benchmarks/ep_collectives.py --hidden 1024 --tokens 1,8,64,512 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, hidden: int, tokens: list[int], repeats: int, out: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    rows = []
    for n in tokens:
        y = torch.randn(n, hidden)
        gathered = [torch.empty_like(y) for _ in range(world)]

        def all_reduce() -> None:
            dist.all_reduce(y.clone())

        def all_gather_sum() -> None:
            dist.all_gather(gathered, y)
            torch.stack(gathered).sum(0)

        def all_to_all() -> None:  # send each rank its share of the tokens, receive mine from everyone
            per = -(-n // world)
            send = torch.zeros(per * world, hidden)
            send[:n] = y
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)
            recv.view(world, per, hidden).sum(0)

        row = {"tokens": n, "bytes": n * hidden * 4}
        for name, fn in (("all_reduce", all_reduce), ("all_gather_sum", all_gather_sum), ("all_to_all", all_to_all)):
            try:
                row[name + "_us"] = _time(fn, repeats) * 1e6
            except RuntimeError as e:  # a backend without this collective
                row[name + "_us"] = None
                row[name + "_error"] = str(e).splitlines()[0][:120]
        rows.append(row)
    if rank == 0:
        out["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    tokens = [int(t) for t in args.tokens.split(",")]
    mp.spawn(worker, args=(2, port, args.hidden, tokens, args.repeats, out), nprocs=2)
    print(json.dumps({"world": 2, "backend": "gloo", "hidden": args.hidden, "rows": out["rows"]}, indent=2))


if __name__ == "__main__":
    main()
