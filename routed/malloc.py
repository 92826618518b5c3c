"""Keep freed memory in the process: glibc's malloc otherwise hands large blocks back to the kernel and faults
them in again, zeroed, on the next allocation.

A prefill allocates and frees tensors of megabytes per op (scores [H, T, S] in fp32, gathered expert inputs);
by default glibc maps every block above its mmap threshold afresh and trims the heap's top once 128 KiB are
free, so each such tensor costs a page fault per 4 KiB touched — on `small` a 512-token prefill spent ~10-20% of
its time there (its softmax, casts and gathers ran 5-10x slower than on warm memory). `keep_freed_memory()`
raises the mmap threshold to glibc's maximum (32 MiB: larger blocks — weights, the cache — are still mapped
on their own) and the trim threshold to 1 GiB, so freed blocks are reused warm. The cost: the process keeps
up to its high-water mark of transient memory (as PyTorch's CUDA caching allocator does on a GPU), so the loader
hands its own transients back when it is done (`release_freed_memory`). No-op where the C library is not glibc.

Compiled GEMM kernels are memory too: oneDNN compiles one per shape (~1 MB each here) and PyTorch keeps them in
two caches (oneDNN's primitive cache and ideep's), 1024 entries each by default. A server's prompts of every
length bring new shapes (the attention's products take the exact length): 60 prompts of 16-512 tokens grew
`small` bf16 by 0.34 GB, on the way to ~1 GB. `cap_kernel_caches` (run when routed is imported) bounds both at
KERNEL_CACHE_CAPACITY, above a prompt's own working set (~50-60 kernels): the same 60 prompts grew it by 0.17 GB
(`benchmarks/memory_growth.py --lengths 16:512 --prompts 60`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 2**30
KERNEL_CACHE_CAPACITY = 128
KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's cache, ideep's


def cap_kernel_caches() -> None:
    """Bound the caches of compiled GEMM kernels at KERNEL_CACHE_CAPACITY entries, unless the environment sets them.
    Both libraries read their variable once, at their first kernel: this must run before any matmul of the
    process (routed's `__init__` runs it). 40 prompts of 16-512 tokens, three alternating processes each way:
    889 tok/s with the defaults, 901 with 128 (no kernel rebuilt that a prompt needs twice)."""
    for var in KERNEL_CACHE_VARS:
        os.environ.setdefault(var, str(KERNEL_CACHE_CAPACITY))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library the process already runs on, if it is glibc (once per process: cached)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's thresholds (once per process: cached); True if they are set."""
    libc = _glibc()
    ok = (libc is not None and hasattr(libc, "mallopt")
          and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
          and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not ok:
        log.debug("not glibc, or mallopt refused: freed memory goes back to the system as usual")
    return ok


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's `malloc_trim`): what a load's transients (weights read,
    converted, quantized, packed) left free, which the thresholds above would otherwise keep resident."""
    if (libc := _glibc()) is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 * 2**20


def advise_huge_pages(tensors) -> int:
    """Ask Linux for transparent huge pages (2 MiB) under each tensor's storage, before its pages are first
    touched (`madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned stretches inside it; THP's default "madvise" mode
    gives them only where asked); the bytes advised. Decode streams every weight once per token: with 4 KiB
    pages each page is a TLB miss (a two-level page walk in a VM) and a stop for the hardware prefetcher —
    `small` bf16 decode 1.02-1.04x per round, its lm_head read 1.06x (BENCHMARKS.md). No-op elsewhere."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    seen, advised = set(), 0
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + size) // HUGE_PAGE * HUGE_PAGE
        if start in seen or hi <= lo:
            continue
        seen.add(start)
        if madvise(lo, hi - lo, MADV_HUGEPAGE) == 0:
            advised += hi - lo
    return advised


def huge_empty(shape: tuple[int, ...], dtype) -> "torch.Tensor":
    """torch.empty on the CPU with huge pages asked for before anything touches it (`advise_huge_pages`): for
    weights made after the load (the experts' merged gate_up, int4's packing)."""
    import torch

    out = torch.empty(shape, dtype=dtype)
    advise_huge_pages([out])
    return out
