"""Independent pieces of work side by side, each on one CPU thread, instead of one after another on all of them.

A prefill's routed experts are dozens of small GEMMs (~48 rows each on `small`); run one at a time, every GEMM
is split over all of PyTorch's intra-op threads and meets them at a barrier, and the threads share each
expert's weights as they stream in. `map_single_threaded(fn, items)` runs `fn` on the items in worker threads
whose PyTorch ops use one intra-op thread each — as many workers as the caller has intra-op threads — so each
thread keeps to its own experts (1.29x for a layer's 64 x 48-row expert GEMMs on 2 threads, BENCHMARKS.md).
PyTorch's ops release the GIL, so the workers' ops run in parallel.

The workers are started once per thread count. `torch.set_num_threads(1)` in a worker also sets the default
that threads started later begin with, so the caller's count is set again once all the workers have theirs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@functools.cache
def _workers(n: int) -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(n, thread_name_prefix="routed-stream")
    started = threading.Barrier(n)

    def start() -> None:
        torch.set_num_threads(1)
        started.wait()  # every worker thread takes one of these: the pool starts all n

    for f in [pool.submit(start) for _ in range(n)]:
        f.result()
    torch.set_num_threads(n)  # the default for threads started from now on (and this thread's own, unchanged)
    return pool


def map_single_threaded(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """[fn(item) for item in items], computed by one single-threaded worker per intra-op thread of the caller
    (in the caller itself when it has one thread)."""
    n = torch.get_num_threads()
    if n == 1:
        return [fn(item) for item in items]
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # both are per thread

    def call(item: T) -> R:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    return list(_workers(n).map(call, items))
