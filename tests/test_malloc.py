"""routed.malloc: with glibc's thresholds raised, large freed tensors are reused without new page faults."""

from __future__ import annotations

import ctypes
import json
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
