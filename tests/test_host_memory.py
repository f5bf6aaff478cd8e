"""`reuse_freed_memory`: large CPU buffers come back from the heap instead of as fresh pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rvc_lora.host_memory import INT_MAX, _glibc, reuse_freed_memory

_REFILL = """
import resource, sys, torch
from rvc_lora.host_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory(2**30)
def fill():
    torch.empty(48 * 2**20 // 4, dtype=torch.float32).fill_(1.0)  # 48 MB touched, then freed
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))  # the first fill grows the heap; alignment slack can make the next grow it once more
"""


def _refill_faults(mode: str) -> int:
    """Page faults of filling a 48 MB tensor again (the fewest of 5 refills), in a fresh process (malloc's
    state is the process's)."""
    done = subprocess.run([sys.executable, "-c", _REFILL, mode], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's; elsewhere the call changes nothing")
def test_a_large_tensor_allocated_again_reuses_its_pages() -> None:
    pages = 48 * 2**20 // 4096  # above glibc's own mmap threshold (32 MB at most): mapped afresh each time
    assert _refill_faults("default") > pages // 2  # the problem: every page faulted in again
    assert _refill_faults("reuse") < pages // 10  # the heap's pages, already there


@pytest.mark.parametrize("size", [0, -1, INT_MAX + 1])
def test_sizes_outside_mallopts_range_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        reuse_freed_memory(size)
