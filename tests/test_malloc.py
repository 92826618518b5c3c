"""routed.malloc: with glibc's thresholds raised, large freed tensors are reused without new page faults."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, torch
from routed.malloc import keep_freed_memory

def faults_per_round():
    def work():  # what a prefill does: tensors of a few MB made, filled and freed, over and over
        xs = [torch.empty(1 << 20) for _ in range(8)]
        for x in xs:
            x.fill_(1)
        del xs
        y = torch.empty(6 << 20)
        y.fill_(1)
        del y
    work()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        work()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10

before = faults_per_round()
ok = keep_freed_memory()
print(json.dumps({"ok": ok, "before": before, "after": faults_per_round()}))
"""


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc's malloc only")
def test_freed_megabyte_tensors_are_reused_without_page_faults() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    pages = 56 * 2**20 // 4096  # touched per round
    assert r["ok"]
    assert r["before"] > 0.05 * pages, r  # glibc's defaults: blocks handed back and faulted in again
    assert r["after"] < 0.02 * pages, r


RELEASE = r"""
import json, torch
from routed.malloc import keep_freed_memory, release_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
assert keep_freed_memory()
xs = [torch.ones(1 << 20) for _ in range(64)]  # 256 MB in 4 MB blocks: below the mmap threshold, on the heap
start = rss()
del xs
kept = rss()
release_freed_memory()
print(json.dumps({"start": start, "kept": kept, "released": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc's malloc only")
def test_release_hands_the_kept_freed_memory_back() -> None:
    """What keep_freed_memory keeps (a load's transients, say) release_freed_memory returns to the system."""
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["start"] - r["kept"] < 0.2 * 2**28, r  # freed, but kept by the raised thresholds
    assert r["kept"] - r["released"] > 0.8 * 2**28, r  # handed back


def test_importing_routed_caps_the_gemm_kernel_caches_unless_the_environment_sets_them() -> None:
    """Both kernel caches read their capacity once, at their first kernel: routed sets it when imported."""
    from routed.malloc import KERNEL_CACHE_CAPACITY, KERNEL_CACHE_VARS

    code = "import json, os, routed; print(json.dumps({v: os.environ.get(v) for v in %r}))" % (KERNEL_CACHE_VARS,)
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == {v: str(KERNEL_CACHE_CAPACITY) for v in KERNEL_CACHE_VARS}
    env["LRU_CACHE_CAPACITY"] = "7"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["LRU_CACHE_CAPACITY"] == "7"


def _thp_on_request() -> bool:
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    return "[madvise]" in mode or "[always]" in mode


def _huge_kb(start: int, stop: int) -> int:
    """AnonHugePages of the mappings overlapping [start, stop) (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < stop and hi > start
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not _glibc() or not _thp_on_request(), reason="Linux with transparent huge pages on request")
def test_weights_made_with_huge_pages_get_them_and_keep_their_values() -> None:
    import torch

    from routed.malloc import HUGE_PAGE, advise_huge_pages, huge_empty

    w = huge_empty((8 * HUGE_PAGE,), torch.uint8)  # 16 MiB: at least 7 aligned huge pages inside
    w.copy_(torch.arange(w.numel()) % 251)
    start = w.data_ptr()
    assert _huge_kb(start, start + w.numel()) >= 7 * HUGE_PAGE // 1024
    assert torch.equal(w, (torch.arange(w.numel()) % 251).to(torch.uint8))
    assert advise_huge_pages([w, w[5:]]) == advise_huge_pages([w]) >= 7 * HUGE_PAGE  # one storage, counted once
    assert advise_huge_pages([torch.empty(1000)]) == 0  # no whole aligned huge page inside
